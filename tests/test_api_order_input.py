"""Order requests that can never do what they say are refused at the door, over REST and over the
websocket alike, with the same code and a detail that names the field in the client's terms; and
a refused request leaves nothing behind (no order, no reservation, no book change)."""

from __future__ import annotations

import orjson
import pytest
from websockets.sync.client import connect

from tests.api_helpers import SYMBOL, build_world, client, ok, own_server

BAD = [
    ("expire_time before the epoch", {"time_in_force": "GTD", "expire_time": "1969-12-31T23:59:59Z"},
     "expire_time must not be before 1970-01-01"),
    ("post-only IOC", {"time_in_force": "IOC", "post_only": True}, "post-only order rests on the book"),
    ("post-only FOK", {"time_in_force": "FOK", "post_only": True}, "post-only order rests on the book"),
]


@pytest.fixture(scope="module")
def world(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "order_input") as server:
        yield server, build_world(server.http, server.ops_key)


def _order(extra: dict) -> dict:
    return {"symbol": SYMBOL, "side": "buy", "price": "35.00", "quantity": "1.000", **extra}


def _trace(w) -> tuple:
    """What a refused order must not change: the member's orders, its balances, the book."""
    with w.as_("BUY") as c:
        return (ok(c.get("/v1/orders", params={"status": "all"})), ok(c.get("/v1/account")),
                ok(client(w.base).get(f"/v1/book/{SYMBOL}")))


@pytest.mark.parametrize(("what", "extra", "detail"), BAD, ids=[b[0] for b in BAD])
def test_impossible_orders_are_refused_over_rest_and_websocket(world, what, extra, detail):
    server, w = world
    before = _trace(w)
    with w.as_("BUY") as c:
        r = c.post("/v1/orders", json=_order(extra))
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "invalid_request" and detail in body["detail"], body
    with connect(f"{server.ws}/v1/ws", open_timeout=10) as ws:
        ws.send(orjson.dumps({"op": "auth", "id": 1, "api_key": w.keys["BUY"]}).decode())
        assert orjson.loads(ws.recv(10))["type"] == "ack"
        ws.send(orjson.dumps({"op": "order.place", "id": 2, **_order(extra)}).decode())
        answer = orjson.loads(ws.recv(10))
    assert answer["type"] == "error" and answer["id"] == 2, answer
    assert answer["code"] == "invalid_request" and detail in answer["detail"], answer
    assert _trace(w) == before


def test_the_orders_these_rules_leave_alone_are_still_taken(world):
    """The edges of the same rules: post-only GTC rests, a GTD order at the epoch's far side is
    a time the exchange can name (refused only as already past), IOC without post-only trades."""
    _, w = world
    with w.as_("BUY") as c:
        rested = ok(c.post("/v1/orders", json=_order({"post_only": True, "price": "34.00"})), 201)
        assert rested["status"] == "new" and rested["post_only"] is True
        r = c.post("/v1/orders", json=_order({"time_in_force": "GTD", "expire_time": "1970-01-01T00:00:00Z"}))
        assert r.status_code != 400 or r.json()["code"] != "invalid_request", r.text
        ioc = ok(c.post("/v1/orders", json=_order({"time_in_force": "IOC"})), 201)
        assert ioc["status"] == "cancelled"  # nothing to take on an empty ask side
