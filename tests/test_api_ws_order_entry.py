"""Order entry on the websocket against what comes before it and what surrounds it (review33): an
amend refused because of a cancel before it is answered only once that cancel is durable, a
message too large is refused and the connection goes on with every answer, and opening a
connection counts against the address's limit as a REST request does."""

from __future__ import annotations

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from api.auth import Limits
from tests.api_clients import WsTrader
from tests.api_helpers import SYMBOL, build_world, ok, own_server


@pytest.fixture(scope="module")
def shared(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "ws_order_entry") as s:
        s.world = build_world(s.http, s.ops_key)
        yield s


def _bid(price: str = "34.00") -> dict:
    return {"op": "order.place", "symbol": SYMBOL, "side": "buy", "price": price, "quantity": "1.000"}


def _answers(t: WsTrader, ids: list[int]) -> list[dict]:
    """The result or error answering each of `ids`, in the order they arrived."""
    got: list[dict] = []
    while len(got) < len(ids):
        m = orjson.loads(t.ws.recv(10))
        if m.get("id") in ids and m.get("type") in ("result", "error"):
            got.append(m)
    return got


def test_an_amend_refused_because_of_a_cancel_before_it_waits_for_that_cancel(shared):
    """cancel X then amend X, pipelined: the amend is not_found only because of the cancel, so its
    refusal comes after the cancel's durable result; it came first, and a crash before the
    cancel's commit would have left X open after the client was told it was gone (review33)."""
    w = shared.world
    t = WsTrader(shared.ws, w.keys["BUY"], orders_channel=False)
    try:
        for _ in range(5):
            oid = t.request(_bid())["order"]["order_id"]
            cancel = t.send({"op": "order.cancel", "order_id": oid})
            amend = t.send({"op": "order.amend", "order_id": oid, "price": "33.00"})
            first, second = _answers(t, [cancel, amend])
            assert (first["id"], first["type"]) == (cancel, "result"), (first, second)
            assert (second["id"], second["type"], second["code"]) == (amend, "error", "not_found"), second
    finally:
        t.close()


def test_a_message_too_large_is_refused_and_the_connection_goes_on(shared):
    """20 pipelined orders, then a 70 KB message: every order is answered, the large message gets
    payload_too_large with its id, and the socket takes the next order. The library closed the
    connection 1009 and the answers of the orders it had taken were lost (review33)."""
    w = shared.world
    t = WsTrader(shared.ws, w.keys["BUY2"], orders_channel=False)
    try:
        ids = [t.send(_bid("33.00")) for _ in range(20)]
        t.ws.send(orjson.dumps({"op": "ping", "id": 999, "pad": "x" * 70_000}).decode())
        got = _answers(t, [*ids, 999])
        assert sorted(m["id"] for m in got if m["type"] == "result") == sorted(ids)
        big = next(m for m in got if m["id"] == 999)
        assert (big["type"], big["code"]) == ("error", "payload_too_large"), big
        assert t.request(_bid("33.00"))["type"] == "result"
    finally:
        with w.as_("BUY2") as buy:
            ok(buy.delete("/v1/orders", params={"symbol": SYMBOL}))
        t.close()


def test_opening_a_websocket_counts_against_the_address_limit(pg_server, template_db, run):
    """An address over its limit gets 429 with Retry-After on a websocket opening as on REST; it
    opened any number of connections (review33)."""
    with own_server(pg_server, template_db, run, "ws_open_limit", limits=Limits(address_rate=1, address_burst=3)) as s:
        assert [httpx.get(s.http + "/v1/health").status_code for _ in range(5)][-1] == 429
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{s.ws}/v1/ws", open_timeout=10).close()
        r = refused.value.response
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert orjson.loads(r.body)["code"] == "rate_limited"
