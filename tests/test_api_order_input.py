"""Order requests that can never do what they say are refused at the door, over REST and over the
websocket alike, with the same code and a detail that names the field in the client's terms; and
a refused request leaves nothing behind (no order, no reservation, no book change)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.api_helpers import SYMBOL, build_world, client, ok, own_server

BAD = [
    ("expire_time before the epoch", {"time_in_force": "GTD", "expire_time": "1969-12-31T23:59:59Z"},
     "expire_time must not be before 1970-01-01"),
    ("post-only IOC", {"time_in_force": "IOC", "post_only": True}, "post-only order rests on the book"),
    ("post-only FOK", {"time_in_force": "FOK", "post_only": True}, "post-only order rests on the book"),
    # JSON's true or false only: "yes" and 1 were taken as true (review20).
    ("post_only as text", {"post_only": "yes"}, "post_only"),
    ("post_only as a number", {"post_only": 1}, "post_only"),
    ("a control character in the symbol", {"symbol": "LQS\x00-2023"}, "symbol"),
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
    with _ws(server, w) as ws:
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


@contextlib.contextmanager
def _ws(server, w) -> Iterator[ClientConnection]:
    """A websocket authenticated as BUY."""
    with connect(f"{server.ws}/v1/ws", open_timeout=10) as ws:
        ws.send(orjson.dumps({"op": "auth", "id": 1, "api_key": w.keys["BUY"]}).decode())
        assert orjson.loads(ws.recv(10))["type"] == "ack"
        yield ws


def _open_ids(w) -> list[str]:
    with w.as_("BUY") as c:
        return sorted(o["order_id"] for o in ok(c.get("/v1/orders")))


def test_an_order_id_in_the_path_is_decimal_digits_only(world):
    """REST read "12.0", "+12", " 12" and "1_2" in the path as order 12 and acted on it; the
    websocket and every other id the API takes refuse them (review20)."""
    _, w = world
    with w.as_("BUY") as c:
        oid = ok(c.post("/v1/orders", json=_order({"price": "33.00", "quantity": "2.000"})), 201)["order_id"]
        before = _open_ids(w)
        underscored = f"{oid[:1]}_{oid[1:]}" if len(oid) > 1 else f"0_{oid}"
        forms = [f"{oid}.0", f"+{oid}", f"%20{oid}", f"{oid}%20", underscored]
        for form in forms:
            for r in (c.get(f"/v1/orders/{form}"), c.delete(f"/v1/orders/{form}"),
                      c.patch(f"/v1/orders/{form}", json={"quantity": "1.000"})):
                assert r.status_code == 400 and r.json()["code"] == "invalid_request", (form, r.text)
        assert ok(c.get(f"/v1/orders/{oid}"))["remaining_quantity"] == "2.000"
    assert _open_ids(w) == before


def test_a_slash_too_many_after_orders_cancels_nothing(world):
    """DELETE /v1/orders/ (an empty order id) was redirected to DELETE /v1/orders, cancel-all, for
    any client that follows redirects (review20): it is not found."""
    _, w = world
    with w.as_("BUY") as c:
        ok(c.post("/v1/orders", json=_order({"price": "33.00"})), 201)
        before = _open_ids(w)
        r = c.delete("/v1/orders/", follow_redirects=True)
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    assert _open_ids(w) == before != []


def test_the_largest_order_id_is_the_same_over_rest_and_websocket(world):
    server, w = world
    largest, beyond = str(2**62), str(2**62 + 1)
    with w.as_("BUY") as c:
        assert c.delete(f"/v1/orders/{largest}").json()["code"] == "not_found"
        assert c.delete(f"/v1/orders/{beyond}").json()["code"] == "invalid_request"
    with _ws(server, w) as ws:
        for ident, order_id, code in ((2, largest, "not_found"), (3, beyond, "invalid_request")):
            ws.send(orjson.dumps({"op": "order.cancel", "id": ident, "order_id": order_id}).decode())
            answer = orjson.loads(ws.recv(10))
            assert answer["type"] == "error" and answer["id"] == ident and answer["code"] == code, answer


def test_a_message_orjson_cannot_read_is_answered_with_its_id(world):
    """NaN, 1e400 and a lone surrogate are not JSON to the websocket's parser; the error still
    names the request (a pipelining client matches answers by id), and nothing changes."""
    server, w = world
    before = _trace(w)
    head = f'{{"op":"order.place","symbol":"{SYMBOL}","side":"buy","price":"35.00"'
    raws = [head + ',"id":7,"quantity":NaN}', head + ',"id":"eight","quantity":1e400}',
            head + ',"id":9,"quantity":"1.000","client_order_id":"\\ud800"}']
    with _ws(server, w) as ws:
        for raw, ident in zip(raws, (7, "eight", 9), strict=True):
            ws.send(raw)
            answer = orjson.loads(ws.recv(10))
            assert answer == {**answer, "type": "error", "id": ident, "code": "invalid_json"}, (raw, answer)
    assert _trace(w) == before
