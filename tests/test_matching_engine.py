"""Tests of the per-instrument rules applied by matching.engine before the book."""

from __future__ import annotations

import pytest

from matching import events as E
from matching.engine import InstrumentRules, MatchingEngine, local_ts

# Wednesday 2026-11-18 in Shanghai.
OPEN = local_ts(2026, 11, 18, 10, 0)
RULES = InstrumentRules(reference_price=5000)  # 50.00 CNY/t, band 45.00..55.00


@pytest.fixture(params=["reference", "cython"])
def engine(request):
    eng = MatchingEngine(request.param)
    eng.add_instrument("CCER-2024", RULES)
    return eng


def codes(evs):
    return [E.REJECT_NAMES[e[2]] for e in evs if e[0] == E.EV_REJECTED]


def accepted(evs):
    return any(e[0] == E.EV_ACCEPTED for e in evs)


@pytest.mark.parametrize(
    ("price", "qty", "code"),
    [
        (5000, 1500, "invalid_lot"),
        (5000, 0, "invalid_quantity"),
        (5000, -1000, "invalid_quantity"),
        (0, 1000, "invalid_price"),
        (-1, 1000, "invalid_price"),
        (4499, 1000, "price_out_of_band"),
        (5501, 1000, "price_out_of_band"),
    ],
)
def test_bad_input_rejected_without_touching_the_book(engine, price, qty, code):
    before = engine.state_digest()
    assert codes(engine.submit("CCER-2024", 1, 7, E.BID, price, qty, OPEN)) == [code]
    assert engine.state_digest() == before


@pytest.mark.parametrize("price", [4500, 5500])
def test_band_edges_are_inside(engine, price):
    assert accepted(engine.submit("CCER-2024", 1, 7, E.BID, price, 1000, OPEN))


def test_off_tick_rejected():
    eng = MatchingEngine("cython")
    eng.add_instrument("X", InstrumentRules(tick=5))
    assert codes(eng.submit("X", 1, 7, E.BID, 5001, 1000, OPEN)) == ["invalid_tick"]
    assert accepted(eng.submit("X", 2, 7, E.BID, 5005, 1000, OPEN))


def test_rules_can_change_but_not_lot_or_max_price():
    from dataclasses import replace

    eng = MatchingEngine("cython")
    eng.add_instrument("X", InstrumentRules(max_price=10_000))
    assert codes(eng.submit("X", 1, 7, E.BID, 10_001, 1000, OPEN)) == ["invalid_price"]
    eng.set_rules("X", replace(eng.rules("X"), reference_price=5000))
    assert codes(eng.submit("X", 2, 7, E.BID, 6000, 1000, OPEN)) == ["price_out_of_band"]
    for bad in (replace(eng.rules("X"), lot=10), replace(eng.rules("X"), max_price=20_000)):
        with pytest.raises(ValueError):
            eng.set_rules("X", bad)


def test_min_quantity():
    eng = MatchingEngine("reference")
    eng.add_instrument("X", InstrumentRules(min_qty=10_000))
    assert codes(eng.submit("X", 1, 7, E.BID, 5000, 9000, OPEN)) == ["min_quantity"]
    assert accepted(eng.submit("X", 2, 7, E.BID, 5000, 10_000, OPEN))


@pytest.mark.parametrize(
    ("hour", "minute", "is_open"),
    [(9, 29, False), (9, 30, True), (11, 29, True), (11, 30, False), (12, 0, False),
     (13, 0, True), (14, 59, True), (15, 0, False)],
)
def test_sessions_in_shanghai_time(engine, hour, minute, is_open):
    ts = local_ts(2026, 11, 18, hour, minute)
    evs = engine.submit("CCER-2024", 1, 7, E.BID, 5000, 1000, ts)
    assert accepted(evs) == is_open
    if not is_open:
        assert codes(evs) == ["market_closed"]


def test_fast_shanghai_clock_matches_zoneinfo():
    import random
    from datetime import UTC, datetime, timedelta

    from matching.engine import SHANGHAI, shanghai_weekday_minute

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    r = random.Random(5)
    samples = [r.randrange(0, 4_000_000_000) * 1_000_000 + r.randrange(1_000_000)
               for _ in range(3000)]
    samples += [694_224_000_000_000 + d for d in (-1, 0, 1)]
    for ts in samples:
        local = (epoch + timedelta(microseconds=ts)).astimezone(SHANGHAI)
        assert shanghai_weekday_minute(ts) == (local.weekday(), local.hour * 60 + local.minute)


def test_weekend_closed_and_always_open(engine):
    saturday = local_ts(2026, 11, 21, 10, 0)
    assert codes(engine.submit("CCER-2024", 1, 7, E.BID, 5000, 1000, saturday)) == [
        "market_closed"]
    engine.add_instrument("DEMO", InstrumentRules(always_open=True))
    assert accepted(engine.submit("DEMO", 1, 7, E.BID, 5000, 1000, saturday))


def test_halt_rejects_orders_and_amends_but_allows_cancel(engine):
    engine.submit("CCER-2024", 1, 7, E.BID, 5000, 1000, OPEN)
    engine.halt("CCER-2024")
    assert codes(engine.submit("CCER-2024", 2, 7, E.BID, 5000, 1000, OPEN)) == ["halted"]
    assert codes(engine.amend("CCER-2024", 1, 5001, 1000, OPEN)) == ["halted"]
    assert engine.cancel("CCER-2024", 1, OPEN)[0][0] == E.EV_CANCELLED
    engine.resume("CCER-2024")
    assert accepted(engine.submit("CCER-2024", 3, 7, E.BID, 5000, 1000, OPEN))


def test_amend_checks_rules(engine):
    engine.submit("CCER-2024", 1, 7, E.BID, 5000, 2000, OPEN)
    assert codes(engine.amend("CCER-2024", 1, 5000, 1500, OPEN)) == ["invalid_lot"]
    assert codes(engine.amend("CCER-2024", 1, 6000, 1000, OPEN)) == ["price_out_of_band"]
    assert codes(engine.amend("CCER-2024", 9, 5000, 1000, OPEN)) == ["not_found"]
    assert engine.amend("CCER-2024", 1, 5000, 1000, OPEN)[0] == (E.EV_AMENDED, 1, 5000, 1000)


def test_market_orders(engine):
    engine.submit("CCER-2024", 1, 8, E.ASK, 5000, 3000, OPEN)
    assert codes(engine.submit("CCER-2024", 2, 7, E.BID, 0, 1000, OPEN, kind=E.MARKET)) == [
        "invalid_order"]
    assert codes(engine.submit("CCER-2024", 3, 7, E.BID, 0, 1000, OPEN, tif=E.FOK,
                               kind=E.MARKET, cash_cap=10**6)) == ["invalid_order"]
    evs = engine.submit("CCER-2024", 4, 7, E.BID, 0, 3000, OPEN, kind=E.MARKET, cash_cap=10_000)
    assert [e for e in evs if e[0] == E.EV_TRADE] == [
        (E.EV_TRADE, 4, 1, 7, 8, E.BID, 5000, 2000)]
    assert evs[-1] == (E.EV_CANCELLED, 4, 1000, E.CANCEL_CASH_CAP)


def test_stp_is_per_account(engine):
    engine.submit("CCER-2024", 1, 7, E.ASK, 5000, 1000, OPEN)
    engine.set_account_stp(7, E.STP_CANCEL_INCOMING)
    evs = engine.submit("CCER-2024", 2, 7, E.BID, 5000, 1000, OPEN)
    assert evs[-1] == (E.EV_CANCELLED, 2, 1000, E.CANCEL_SELF_TRADE)
    engine.set_account_stp(7, E.STP_NONE)
    evs = engine.submit("CCER-2024", 3, 7, E.BID, 5000, 1000, OPEN)
    assert any(e[0] == E.EV_TRADE for e in evs)


def test_default_stp_cancels_resting(engine):
    engine.submit("CCER-2024", 1, 7, E.ASK, 5000, 1000, OPEN)
    evs = engine.submit("CCER-2024", 2, 7, E.BID, 5000, 1000, OPEN)
    assert (E.EV_CANCELLED, 1, 1000, E.CANCEL_SELF_TRADE) in evs


def test_unknown_instrument(engine):
    assert codes(engine.submit("NOPE", 1, 7, E.BID, 5000, 1000, OPEN)) == ["unknown_instrument"]


def test_gtd_expiry_driven_by_command_time(engine):
    later = OPEN + 60_000_000
    engine.submit("CCER-2024", 1, 7, E.ASK, 5000, 1000, OPEN, tif=E.GTD, expire_ts=later)
    engine.add_instrument("B", RULES)
    engine.submit("B", 1, 7, E.ASK, 5000, 1000, OPEN, tif=E.GTD, expire_ts=later)
    assert engine.expire(later - 1) == []
    out = engine.expire(later)
    assert [(name, e[0]) for name, e in out if e[0] == E.EV_EXPIRED] == [
        ("B", E.EV_EXPIRED), ("CCER-2024", E.EV_EXPIRED)]
    # Expiry also runs before a rejected command, so the reject follows it.
    engine.submit("B", 2, 7, E.ASK, 5000, 1000, OPEN, tif=E.GTD, expire_ts=later + 5)
    evs = engine.submit("B", 3, 7, E.BID, 9999, 1000, later + 5)
    assert [e[0] for e in evs] == [E.EV_EXPIRED, E.EV_LEVEL, E.EV_REJECTED]


def test_engines_agree_and_snapshot_round_trips():
    outs, digests = [], []
    for name in ("reference", "cython"):
        eng = MatchingEngine(name)
        eng.add_instrument("X", RULES)
        evs = []
        for k in range(200):
            side = k % 2
            price = 4800 + (k * 37) % 400
            evs += eng.submit("X", k, k % 5, side, price, 1000 * (1 + k % 3), OPEN + k)
        outs.append(E.encode(evs))
        digests.append(eng.state_digest())
        twin = MatchingEngine("cython" if name == "reference" else "reference")
        twin.add_instrument("X", RULES)
        twin.restore(eng.snapshot())
        assert twin.state_digest() == eng.state_digest()
    assert outs[0] == outs[1]
    assert digests[0] == digests[1]
