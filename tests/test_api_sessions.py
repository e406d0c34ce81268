"""Operator administration and market sessions through the network API (review32): the day's
close never narrows a band to one price, listings under which no order could be placed are
refused, payment references are read without surrounding spaces, a repeat of a payment made
while the exchange was stopped answers as a repeat, and a halt's or resume's answer is the state
its own command left."""

from __future__ import annotations

import time

import pytest

from exchange.service import now_us
from tests.api_helpers import SYMBOL, ServerThread, build_world, client, ok, operator_key
from tests.test_api_rest import problem

DAY = 86_400_000_000


@pytest.fixture
def server(db, run):
    with ServerThread(db) as s:
        s.ops_key = run(operator_key(db))
        yield s


def _limit(side: str, price: str, quantity: str = "1.000") -> dict:
    return {"symbol": SYMBOL, "side": side, "type": "limit", "price": price, "quantity": quantity}


def test_the_days_close_never_pins_the_band_to_one_price(db, run):
    """Tick 1.00, reference 10.00, band 10 % (9.00 to 11.00): the day trades at 9.00, and 9.00
    +-10 % holds no price on the grid but 9.00. The close keeps a tick either way (8.00 to
    10.00), day after day; it used to leave only 9.00, for good (review32)."""
    key = run(operator_key(db))
    shift = [0]
    with ServerThread(db, service_options={"clock": lambda: now_us() + shift[0]}) as s:
        w = build_world(s.http, key, listing={"tick": "1.00", "reference_price": "10.00", "band_percent": "10"})
        with w.as_("DEV") as dev, w.as_("BUY") as buy, client(s.http) as anon:
            for day in (0, 1, 2):
                shift[0] = day * DAY
                inst = ok(anon.get(f"/v1/instruments/{SYMBOL}"))
                for _ in range(100):  # the timer applies the close within a second of its time
                    if not day or inst["reference_price"] == "9.00":
                        break
                    time.sleep(0.05)
                    inst = ok(anon.get(f"/v1/instruments/{SYMBOL}"))
                if day:
                    assert (inst["reference_price"], inst["price_band"]) == (
                        "9.00", {"low": "8.00", "high": "10.00"}), (day, inst)
                    for price, status in (("7.00", 422), ("8.00", 201), ("10.00", 201), ("11.00", 422)):
                        r = dev.post("/v1/orders", json=_limit("sell", price))
                        assert r.status_code == status, (day, price, r.text)
                        if status == 201:
                            ok(dev.delete(f"/v1/orders/{r.json()['order_id']}"))
                ok(dev.post("/v1/orders", json=_limit("sell", "9.00")), 201)
                ok(buy.post("/v1/orders", json=_limit("buy", "9.00")), 201)


def test_listings_no_order_could_be_placed_under_are_refused(server):
    """A lot or a minimum quantity above the largest order (1099511627.776 t) is refused with
    invalid_rules and lists nothing; it was listed, and every order on it refused (review32)."""
    build_world(server.http, server.ops_key)
    with client(server.http, server.ops_key) as ops, client(server.http) as anon:
        before = ok(anon.get("/v1/instruments"))
        for i, extra in enumerate([{"lot": "99999999999.000"},
                                   {"lot": "1.000", "min_quantity": "99999999999999.000"},
                                   {"lot": "1099511627.777"}]):
            body = {"symbol": f"FOREST-{2060 + i}", "reference_price": "35.00", "always_open": True, **extra}
            out = problem(ops.post("/v1/instruments", json=body), 400, "invalid_rules")
            assert "1099511627.776" in out["detail"], out
        assert ok(anon.get("/v1/instruments")) == before
        biggest = ok(ops.post("/v1/instruments", json={"symbol": "FOREST-2070", "reference_price": "35.00",
                                                       "lot": "1099511627.776", "always_open": True}), 201)
        assert biggest["lot"] == "1099511627.776"
