"""An offset is sized from what the cheapest offers cost, not from the reservation's worst case
(review31): on a 1 kg-lot event instrument a cap a little above the cost is filled, a cap below
it is refused with the cost, and a refusal that counts the tonnes offered leaves out the buyer's
own offers. Symbols are read in any case, as retirements read them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.api_helpers import build_world, client, ok, own_server
from tests.test_api_rest import problem

KG_SYMBOL = "EVENTPOOL-2024"  # a retail/event instrument with a 1 kg lot (DESIGN.md)

# A one-day, 300-person conference: 1931.927 kg, offset as 1.932 t
CONFERENCE = {"attendees": 300, "days": 1, "electricity": [{"kwh": "1500", "region": "sichuan"}],
              "travel": [{"mode": "metro", "passenger_km": "4500"},
                         {"mode": "high_speed_rail", "people": 20, "km_per_person": "300", "round_trip": True}],
              "hotel_room_nights": 10, "meals": [{"kind": "standard", "count": 300}],
              "materials": [{"kind": "paper", "kg": "30"}], "waste": [{"kind": "landfill", "kg": "100"}]}


@pytest.fixture(scope="module")
def world(pg_server, template_db, run):
    with own_server(pg_server, template_db, run, "offset_costs") as server:
        w = build_world(server.http, server.ops_key, symbol=KG_SYMBOL,
                        listing={"lot": "0.001", "min_quantity": "0.001", "reference_price": "13.89"})
        with w.as_("DEV") as dev:
            ok(dev.post("/v1/orders", json={"symbol": KG_SYMBOL, "side": "sell", "type": "limit", "price": "13.89",
                                            "quantity": "10.000"}), 201)
        yield server, w


def _offset(member, **body):
    return member.post("/v1/neutrality/offset", json={"beneficiary": "Green tech conference 2026",
                                                      "purpose": "Carbon neutrality", **body})


def test_a_cap_just_above_the_cost_fills_on_a_kg_lot(world):
    """1.932 t at 13.89 cost 26.84 CNY and a 0.03 fee: 26.87. A cap of 27.00 is filled and the
    cash moves by exactly the cost; a cap of 26.86 is refused saying what they cost. Caps up to
    60.00 were refused, the reservation allowing 2 fen a kilogram for rounding (review31)."""
    _, w = world
    with w.as_("BUY") as buy:
        before = Decimal(ok(buy.get("/v1/account"))["cash_available"])
        out = problem(_offset(buy, symbol=KG_SYMBOL, activity=CONFERENCE, max_cash="26.86"), 422, "offset_not_filled")
        assert "cost 26.87 CNY" in out["detail"] and "max_cash 26.86 CNY" in out["detail"], out
        assert Decimal(ok(buy.get("/v1/account"))["cash_available"]) == before
        done = ok(_offset(buy, symbol=KG_SYMBOL, activity=CONFERENCE, max_cash="27.00"), 201)
        assert (done["quantity"], done["cost"]) == ("1.932", "26.87"), done
        assert Decimal(ok(buy.get("/v1/account"))["cash_available"]) == before - Decimal("26.87")


def test_a_refusal_does_not_count_the_buyers_own_offers(world):
    """DEV holds the only offers: its offset cannot fill (self-trade prevention cancels its own
    offers instead), and the refusal says none are offered; it said 10 t were offered and 0 t
    missing (review31)."""
    _, w = world
    with w.as_("DEV") as dev:
        out = problem(_offset(dev, symbol=KG_SYMBOL, quantity="2.000", max_cash="100.00"), 422, "offset_not_filled")
        assert "offers 0.000 t" in out["detail"] and "2.000 t are missing" in out["detail"], out


def test_an_offset_reads_the_symbol_in_any_case(world):
    _, w = world
    with w.as_("BUY2") as buy:
        done = ok(_offset(buy, symbol=f" {KG_SYMBOL.lower()} ", quantity="0.010", max_cash="1.00"), 201)
        assert done["quantity"] == "0.010"


def test_an_organiser_with_just_the_cost_can_offset(world):
    """The fill-or-kill the offset places is held to what it meets in the book, not to the worst
    case (2 fen a kilogram on a 1 kg lot): an organiser funded with 26.87 CNY offsets the 1.932 t
    conference, and is left with nothing (review31; it was insufficient_funds below 64.31)."""
    server, _ = world
    with client(server.http, server.ops_key) as ops:
        key = ok(ops.post("/v1/accounts", json={"code": "EXPO-ORG", "kind": "event_organiser"}), 201)["api_key"]
        ok(ops.post("/v1/accounts/EXPO-ORG/deposits", json={"amount": "26.87", "reference": "expo-org-1"}), 201)
    with client(server.http, key) as org:
        done = ok(_offset(org, symbol=KG_SYMBOL, activity=CONFERENCE, max_cash="26.87"), 201)
        assert (done["quantity"], done["cost"]) == ("1.932", "26.87"), done
        account = ok(org.get("/v1/account"))
        assert (account["cash_available"], account["cash_reserved"]) == ("0.00", "0.00"), account
