"""Unit tests of each order type and edge case, run against both books (same expectations)."""

from __future__ import annotations

import pytest

from matching import events as E
from matching.book import make_book
from matching.events import ASK, BID, FOK, GTC, GTD, IOC, MARKET

A, B = 1, 2  # accounts


@pytest.fixture(params=["reference", "cython"])
def book(request):
    return make_book(request.param)


def trades(evs):
    return [(e[1], e[2], e[6], e[7]) for e in evs if e[0] == E.EV_TRADE]


def rejected(evs):
    return [E.REJECT_NAMES[e[2]] for e in evs if e[0] == E.EV_REJECTED]


def seed_asks(book, *levels):
    """Rest asks (id, price, qty) from account A and drop the events."""
    for oid, price, qty in levels:
        book.submit(oid, A, ASK, price, qty)
    book.clear_events()


def test_limit_rests_then_trades_at_resting_price(book):
    book.submit(1, A, ASK, 100, 5)
    assert book.events() == [(E.EV_ACCEPTED, 1, A, ASK, 100, 5), (E.EV_LEVEL, ASK, 100, 5)]
    book.submit(2, B, BID, 105, 3)
    assert book.events() == [
        (E.EV_ACCEPTED, 2, B, BID, 105, 3),
        (E.EV_TRADE, 2, 1, B, A, BID, 100, 3),
        (E.EV_LEVEL, ASK, 100, 2),
    ]
    assert book.order(1)[4] == 2
    assert book.order(2) is None


def test_price_time_priority(book):
    seed_asks(book, (1, 101, 5), (2, 100, 5), (3, 100, 5))
    book.submit(9, B, BID, 101, 12)
    assert trades(book.events()) == [(9, 2, 100, 5), (9, 3, 100, 5), (9, 1, 101, 2)]
    assert book.depth(ASK) == [(101, 3)]


def test_ioc_partial_fill_cancels_remainder(book):
    seed_asks(book, (1, 100, 3))
    book.submit(2, B, BID, 100, 5, IOC)
    evs = book.events()
    assert trades(evs) == [(2, 1, 100, 3)]
    assert evs[-1] == (E.EV_CANCELLED, 2, 2, E.CANCEL_UNFILLED)
    assert len(book) == 0


def test_ioc_that_cannot_trade_never_rests(book):
    book.submit(1, B, BID, 100, 5, IOC)
    assert book.events()[-1] == (E.EV_CANCELLED, 1, 5, E.CANCEL_UNFILLED)
    assert book.best_bid() is None


def test_fok_exactly_fillable(book):
    seed_asks(book, (1, 100, 3), (2, 101, 2))
    book.submit(3, B, BID, 101, 5, FOK)
    assert trades(book.events()) == [(3, 1, 100, 3), (3, 2, 101, 2)]
    assert len(book) == 0


def test_fok_one_short_is_rejected_without_touching_the_book(book):
    seed_asks(book, (1, 100, 3), (2, 101, 2), (3, 102, 10))
    before = book.state_digest()
    book.submit(4, B, BID, 101, 6, FOK)
    assert book.events() == [(E.EV_REJECTED, 4, E.REJECT_FOK_NOT_FILLABLE)]
    assert book.state_digest() == before


def test_post_only_that_would_cross_is_rejected(book):
    seed_asks(book, (1, 100, 3))
    book.submit(2, B, BID, 100, 1, post_only=True)
    assert rejected(book.events()) == ["post_only_would_take"]
    book.submit(3, B, BID, 99, 1, post_only=True)
    assert book.events()[-1] == (E.EV_LEVEL, BID, 99, 1)


def test_post_only_amend_that_would_cross_is_rejected(book):
    seed_asks(book, (1, 100, 3))
    book.submit(2, B, BID, 99, 1, post_only=True)
    book.clear_events()
    book.move(2, 100)
    assert rejected(book.events()) == ["post_only_would_take"]
    assert book.order(2)[3] == 99


def test_market_sell_sweeps_and_cancels_rest(book):
    book.submit(1, A, BID, 100, 2)
    book.submit(2, A, BID, 99, 2)
    book.clear_events()
    book.submit(3, B, ASK, 0, 5, kind=MARKET)
    evs = book.events()
    assert evs[0] == (E.EV_ACCEPTED, 3, B, ASK, 0, 5)
    assert trades(evs) == [(3, 1, 100, 2), (3, 2, 99, 2)]
    assert evs[-1] == (E.EV_CANCELLED, 3, 1, E.CANCEL_UNFILLED)


def test_market_buy_stops_at_cash_cap():
    # Engine units: fen per tonne and kg; lot 1000 kg. 50.00 CNY/t; cap 120.00 CNY buys 2 t.
    for engine in ("reference", "cython"):
        book = make_book(engine, lot=1000)
        book.submit(1, A, ASK, 5000, 5000)
        book.clear_events()
        book.submit(2, B, BID, 0, 5000, kind=MARKET, cash_cap=12_000)
        evs = book.events()
        assert trades(evs) == [(2, 1, 5000, 2000)]
        assert evs[-1] == (E.EV_CANCELLED, 2, 3000, E.CANCEL_CASH_CAP)


def test_cancel_and_unknown_cancel(book):
    seed_asks(book, (1, 100, 3))
    book.cancel(1)
    assert book.events() == [(E.EV_CANCELLED, 1, 3, E.CANCEL_USER), (E.EV_LEVEL, ASK, 100, 0)]
    book.cancel(1)
    assert book.events() == [(E.EV_REJECTED, 1, E.REJECT_NOT_FOUND)]


def test_duplicate_id_rejected(book):
    seed_asks(book, (1, 100, 3))
    book.submit(1, B, BID, 90, 1)
    assert rejected(book.events()) == ["duplicate_order_id"]
    assert book.best_bid() is None


@pytest.mark.parametrize(
    ("price", "qty", "code"),
    [(100, 0, "invalid_quantity"), (100, -1, "invalid_quantity"), (0, 1, "invalid_price"),
     (-5, 1, "invalid_price"), (1 << 22, 1, "invalid_price")],
)
def test_bad_price_or_quantity_rejected(book, price, qty, code):
    book.submit(1, A, BID, price, qty)
    assert rejected(book.events()) == [code]
    assert len(book) == 0


@pytest.mark.parametrize(
    ("side", "tif", "kind", "stp"), [(2, 0, 0, 0), (-1, 0, 0, 0), (0, 4, 0, 0), (0, 0, 2, 0),
                                     (0, 0, 0, 4), (0, -1, 0, 0)],
)
def test_out_of_range_enums_rejected(book, side, tif, kind, stp):
    seed_asks(book, (1, 100, 3))
    before = book.state_digest()
    book.submit(2, B, side, 100, 1, tif, kind=kind, stp=stp)
    assert rejected(book.events()) == ["invalid_order"]
    assert book.state_digest() == before


def test_reduce_keeps_priority(book):
    seed_asks(book, (1, 100, 5), (2, 100, 5))
    book.amend(1, 100, 2)
    assert book.events() == [(E.EV_AMENDED, 1, 100, 2), (E.EV_LEVEL, ASK, 100, 7)]
    book.submit(3, B, BID, 100, 2)
    assert trades(book.events()) == [(3, 1, 100, 2)]


def test_reduce_loses_priority_when_configured():
    for engine in ("reference", "cython"):
        book = make_book(engine, reduce_loses_priority=True)
        seed_asks(book, (1, 100, 5), (2, 100, 5))
        book.reduce(1, 3)
        book.submit(3, B, BID, 100, 2)
        assert trades(book.events()) == [(3, 2, 100, 2)]


def test_increase_loses_priority(book):
    seed_asks(book, (1, 100, 5), (2, 100, 5))
    book.amend(1, 100, 6)
    book.submit(3, B, BID, 100, 2)
    assert trades(book.events()) == [(3, 2, 100, 2)]


def test_price_change_loses_priority_and_may_trade(book):
    seed_asks(book, (1, 101, 5), (2, 100, 5))
    book.submit(3, B, BID, 99, 4)
    book.clear_events()
    book.move(3, 100)
    evs = book.events()
    assert evs[0] == (E.EV_AMENDED, 3, 100, 4)
    assert trades(evs) == [(3, 2, 100, 4)]
    book.move(1, 100)  # 1 joins price 100 behind what is left of 2
    book.submit(4, B, BID, 100, 2)
    assert trades(book.events()) == [(4, 2, 100, 1), (4, 1, 100, 1)]


def test_reduce_to_zero_cancels(book):
    seed_asks(book, (1, 100, 5))
    book.reduce(1, 5)
    assert book.events()[0] == (E.EV_CANCELLED, 1, 5, E.CANCEL_USER)
    assert len(book) == 0


def test_stp_cancel_resting(book):
    seed_asks(book, (1, 100, 2), (2, 100, 3))  # both account A
    book.submit(3, B, ASK, 100, 4)
    book.clear_events()
    book.submit(4, A, BID, 100, 5, stp=E.STP_CANCEL_RESTING)
    evs = book.events()
    assert [e for e in evs if e[0] == E.EV_CANCELLED] == [
        (E.EV_CANCELLED, 1, 2, E.CANCEL_SELF_TRADE), (E.EV_CANCELLED, 2, 3, E.CANCEL_SELF_TRADE)]
    assert trades(evs) == [(4, 3, 100, 4)]
    assert book.depth(BID) == [(100, 1)]


def test_stp_cancel_incoming(book):
    seed_asks(book, (1, 100, 2))
    book.submit(2, B, ASK, 101, 3)
    book.clear_events()
    book.submit(3, A, BID, 101, 5, stp=E.STP_CANCEL_INCOMING)
    evs = book.events()
    assert trades(evs) == []
    assert evs[-1] == (E.EV_CANCELLED, 3, 5, E.CANCEL_SELF_TRADE)
    assert book.order(1) is not None


def test_stp_cancel_both(book):
    book.submit(1, B, ASK, 99, 1)
    seed_asks(book, (2, 100, 2))
    book.submit(3, A, BID, 100, 5, stp=E.STP_CANCEL_BOTH)
    evs = book.events()
    assert trades(evs) == [(3, 1, 99, 1)]
    assert (E.EV_CANCELLED, 2, 2, E.CANCEL_SELF_TRADE) in evs
    assert evs[-1] == (E.EV_CANCELLED, 3, 4, E.CANCEL_SELF_TRADE)
    assert len(book) == 0


def test_stp_none_lets_an_account_trade_with_itself(book):
    seed_asks(book, (1, 100, 2))
    book.submit(2, A, BID, 100, 2)
    assert trades(book.events()) == [(2, 1, 100, 2)]


def test_fok_counts_only_liquidity_stp_leaves(book):
    seed_asks(book, (1, 100, 2))  # account A
    book.submit(2, B, ASK, 100, 2)
    book.clear_events()
    book.submit(3, A, BID, 100, 3, FOK, stp=E.STP_CANCEL_RESTING)
    assert rejected(book.events()) == ["fok_not_fillable"]
    book.submit(4, A, BID, 100, 2, FOK, stp=E.STP_CANCEL_RESTING)
    assert trades(book.events()) == [(4, 2, 100, 2)]


def test_gtd_expires_on_next_command_in_order(book):
    book.submit(1, A, ASK, 100, 1, GTD, ts=0, expire_ts=50)
    book.submit(2, A, ASK, 101, 1, GTD, ts=0, expire_ts=40)
    book.submit(3, A, ASK, 102, 1, GTD, ts=0, expire_ts=40)
    book.clear_events()
    book.submit(4, B, BID, 90, 1, ts=49)  # 2 and 3 expire first, by (expire_ts, id)
    evs = book.events()
    assert [e for e in evs if e[0] == E.EV_EXPIRED] == [(E.EV_EXPIRED, 2, 1), (E.EV_EXPIRED, 3, 1)]
    assert evs[0] == (E.EV_EXPIRED, 2, 1)
    book.expire(50)
    assert book.events()[0] == (E.EV_EXPIRED, 1, 1)
    assert book.best_ask() is None


def test_gtd_not_expired_before_its_time(book):
    book.submit(1, A, ASK, 100, 1, GTD, ts=0, expire_ts=50)
    book.expire(49)
    assert book.events()[-1][0] != E.EV_EXPIRED
    assert book.order(1) is not None


def test_gtd_already_expired_is_rejected(book):
    book.submit(1, A, ASK, 100, 1, GTD, ts=10, expire_ts=10)
    assert rejected(book.events()) == ["invalid_expiry"]


@pytest.mark.parametrize("engine", ["reference", "cython"])
@pytest.mark.parametrize("options", [{"max_price": 0}, {"max_price": (1 << 26) + 1}, {"lot": 0}])
def test_book_options_are_checked(engine, options):
    with pytest.raises(ValueError):
        make_book(engine, **options)


@pytest.mark.parametrize("side", [2, -1])
def test_depth_of_a_bad_side_is_an_error(book, side):
    with pytest.raises(ValueError):
        book.depth(side)


def test_order_listing_in_priority_order(book):
    seed_asks(book, (1, 101, 1), (2, 100, 1), (3, 100, 1))
    book.submit(4, B, BID, 98, 1)
    book.submit(5, B, BID, 99, 1)
    assert [o[0] for o in book.orders()] == [5, 4, 2, 3, 1]
    assert book.depth(BID) == [(99, 1), (98, 1)]


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": 5, "orders": [(1, A, 2, 100, 1, GTC, 0, 0, 0, 0)]},  # side
        {"seq": 5, "orders": [(1, A, BID, 0, 1, GTC, 0, 0, 0, 0)]},  # price
        {"seq": 5, "orders": [(1, A, BID, 100, 0, GTC, 0, 0, 0, 0)]},  # quantity
        {"seq": 5, "orders": [(1, A, BID, 100, 1, IOC, 0, 0, 0, 0)]},  # IOC cannot rest
        {"seq": 5, "orders": [(1, A, BID, 100, 1, GTC, 0, 0, 0, 0),
                              (1, A, BID, 99, 1, GTC, 0, 0, 0, 1)]},  # duplicate id
        {"seq": 1, "orders": [(1, A, BID, 100, 1, GTC, 0, 0, 0, 3)]},  # seq beyond counter
        {"seq": 5, "orders": [(1, A, BID, 100, 1, GTC, 0, 0, 0, 0),
                              (2, B, ASK, 100, 1, GTC, 0, 0, 0, 1)]},  # crossed
        {"orders": []},
    ],
)
def test_restore_rejects_corrupt_snapshots(book, bad):
    seed_asks(book, (1, 100, 3))
    before = book.state_digest()
    with pytest.raises(ValueError):
        book.restore(bad)
    assert book.state_digest() == before


def test_raw_events_match_decoded():
    import struct

    book = make_book("cython")
    book.submit(1, A, ASK, 100, 5)
    book.submit(2, B, BID, 100, 2)
    raw = book.raw_events()
    decoded = book.events()
    records = [struct.unpack("<8q", raw[k : k + 64]) for k in range(0, len(raw), 64)]
    assert [r[: len(e)] for r, e in zip(records, decoded, strict=True)] == decoded


def test_describe_and_encode():
    e = (E.EV_TRADE, 2, 1, B, A, BID, 100, 3)
    assert E.describe(e) == {"type": "trade", "taker_id": 2, "maker_id": 1, "taker_account": B,
                             "maker_account": A, "taker_side": BID, "price": 100, "qty": 3}
    assert E.describe((E.EV_REJECTED, 7, E.REJECT_HALTED))["code"] == "halted"
    assert E.describe((E.EV_CANCELLED, 7, 3, E.CANCEL_SELF_TRADE))["reason"] == "self_trade"
    assert E.encode([e, (E.EV_LEVEL, ASK, 100, 0)]) == b"[[3,2,1,2,1,0,100,3],[7,1,100,0]]"


def test_make_book_follows_parameter_then_environment(monkeypatch):
    from cext.book import CythonBook

    from matching.reference import ReferenceBook

    monkeypatch.delenv("CARBONX_BOOK", raising=False)
    assert type(make_book()) is CythonBook
    monkeypatch.setenv("CARBONX_BOOK", "reference")
    assert type(make_book()) is ReferenceBook
    assert type(make_book("cython")) is CythonBook
    monkeypatch.setenv("CARBONX_BOOK", "cobol")
    with pytest.raises(ValueError):
        make_book()


def test_gtd_heap_stays_bounded_under_churn():
    # Lazily deleted expiry entries are compacted away; expiry itself must not change.
    ref, cy = make_book("reference"), make_book("cython")
    for k in range(20_000):
        for b in (ref, cy):
            b.submit(k, A, ASK, 100 + k % 7, 1, GTD, ts=k, expire_ts=10**9 + (k // 10) % 5)
            if k % 10:
                b.cancel(k, ts=k)
            elif k % 20 == 0:
                b.move(k, 110, ts=k)
        assert ref.events() == cy.events()
    assert cy.gtd_heap_size < 5000
    assert len(cy) == 2000
    ref.expire(10**9 + 2)
    cy.expire(10**9 + 2)
    expired = cy.events()
    assert expired == ref.events()
    assert sum(1 for e in expired if e[0] == E.EV_EXPIRED) == 1200
    cy.check_invariants()
