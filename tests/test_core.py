"""Tests of the sequenced exchange core (matching/core.py): what they prove.

Unit tests pin the semantics one rule at a time, on both book engines: a limit buy reserves
``buy_reservation(limit, qty, lot, max(maker_bp, taker_bp))`` (exactly: one fen less of free cash
is refused); a fill consumes value + fee from the reservation and releases what the remainder no
longer needs (price improvement); cancels, IOC and market remainders and GTD expiries give the
reservation or the encumbrance back; a market buy reserves ``market_buy_reservation`` and holds
nothing after its command; fees and values round half-up, fees by maker/taker role; T+1 follows
the Asia/Shanghai calendar (not UTC) and is off when the listing says so; client order ids and
payment references are idempotent; withdrawals see only ``balance - reserved``; ``expire`` needs
something due; halts stop new orders and amends but not cancels; a member cannot see another
account's orders; bad listings are refused. Every rejected command is checked to leave
``state_digest()`` unchanged.

Property tests (hypothesis) drive random command streams over two instruments (one with T+1, one
without, both with fees, the maker fee above the taker fee on one; lot 1 t and lot 100 kg) and four
accounts with small purses and holdings, over several Shanghai days (starting at 22:00, so that the
Shanghai and UTC dates differ for hours): deposits and withdrawals (reusing references), limit and
market orders of every time in force including GTD, post-only, quantities and cash caps at the edge
of what the account has, resends of client order ids, cancels and amends (also by the wrong
account), halts and resumes, time jumping exactly to the next GTD expiry, and ``expire`` whenever
``expiry_due`` (any other command first, which must be refused with ``expiry_due``). After every
command: ``check_invariants()`` is empty; a rejected command or a duplicate leaves
``state_digest()`` unchanged; journal events hold no book reject and expiries only under
``expire``; cash and credits of every account equal an independent model rebuilt from the journal
events alone (so nothing is ever negative); fees and values are half-up by role; a limit buy that
rests untouched holds exactly its ``buy_reservation``; and the outcome is the one the specification
gives from the model: refused for lack of cash (``buy_reservation`` / ``market_buy_reservation`` /
amend difference against ``balance - reserved``) or of credits (held - open sells - bought that
Shanghai day under T+1) exactly when it lacks them, withdrawals likewise, duplicates of payment
references and client order ids answered with the earlier result or refused, ``not_found`` for
another account's order, cancels always accepted, halts/resumes and ``expire`` accepted exactly when
they apply. At the end: cash is conserved (balances + fees == deposits - withdrawals), credits are
conserved per instrument, trade ids run 1, 2, 3... per instrument, replaying the accepted commands
into a fresh core reproduces every outcome and the digest, and ``restore(snapshot())`` (also across
engines) gives the same digest and, continued with the rest of the stream in lockstep with the
original, the same outcomes and digests. A differential test runs the same streams on the Cython
and the reference core in lockstep (outcomes and digests after every command).

The tests under "bugs found" reproduce core bugs these tests found (since fixed in the core).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from matching import events as E
from matching.core import (
    EV_CREDITS_ADJUSTED,
    EV_DEPOSIT,
    EV_LISTED,
    EV_WITHDRAWAL,
    MAX_CASH,
    MAX_HELD_CASH,
    O_ACCOUNT,
    O_REMAINING,
    O_RESERVED,
    O_SIDE,
    O_SYMBOL,
    T_BFEE,
    T_ID,
    T_PRICE,
    T_QTY,
    T_SFEE,
    T_SIDE,
    T_VALUE,
    ExchangeCore,
    Outcome,
    trading_day,
)
from matching.engine import local_ts
from matching.risk import buy_reservation, market_buy_reservation
from matching.units import fee_fen, trade_value_fen

T0 = local_ts(2024, 3, 4, 10, 0)  # Monday 10:00 in Shanghai
MINUTE = 60_000_000
HOUR = 60 * MINUTE
SYM = "CEA-2024"


@pytest.fixture(params=["cython", "reference"])
def engine(request) -> str:
    return request.param


# ---- command builders and checked apply ---------------------------------------------------------


def listing_cmd(symbol: str = SYM, *, lot: int = 1000, maker_bp: int = 0, taker_bp: int = 0, t1: bool = True,
                holdings: tuple = ((1, 10_000),), **rules) -> dict:
    return {"op": "list", "symbol": symbol,
            "rules": {"rules": {"always_open": True, "lot": lot, "min_qty": lot, **rules},
                      "maker_bp": maker_bp, "taker_bp": taker_bp, "t1": t1},
            "holdings": [list(h) for h in holdings]}


def place(account: int, side: int, price: int, qty: int, symbol: str = SYM, **kw) -> dict:
    return {"op": "place", "account": account, "symbol": symbol, "side": side, "kind": E.LIMIT,
            "price": price, "qty": qty, **kw}


def buy(account: int, price: int, qty: int, **kw) -> dict:
    return place(account, E.BID, price, qty, **kw)


def sell(account: int, price: int, qty: int, **kw) -> dict:
    return place(account, E.ASK, price, qty, **kw)


def market(account: int, side: int, qty: int, cash_cap: int | None = None) -> dict:
    return {"op": "place", "account": account, "symbol": SYM, "side": side, "kind": E.MARKET, "qty": qty,
            "tif": E.IOC, "cash_cap": cash_cap}


def deposit(account: int, amount: int, ref: str) -> dict:
    return {"op": "deposit", "account": account, "amount": amount, "ref": ref}


def withdraw(account: int, amount: int, ref: str) -> dict:
    return {"op": "withdraw", "account": account, "amount": amount, "ref": ref}


def cancel(account: int, order_id: int) -> dict:
    return {"op": "cancel", "account": account, "order_id": order_id}


def amend(account: int, order_id: int, price: int, qty: int) -> dict:
    return {"op": "amend", "account": account, "order_id": order_id, "price": price, "qty": qty}


EXPIRE = {"op": "expire"}
ROLL = {"op": "roll", "cancel_outside_band": True, "tick_floor": True}  # as the service journals it


def ok(core: ExchangeCore, cmd: dict, ts: int = T0) -> Outcome:
    """Apply `cmd`, which must be accepted with the next sequence number, invariants intact."""
    seq = core.seq
    out = core.apply(cmd, ts)
    assert out.code is None and not out.duplicate, (cmd, out.code, out.detail)
    assert out.seq == seq + 1 == core.seq
    assert E.EV_REJECTED not in [e[0] for e in out.events]
    assert core.check_invariants() == []
    return out


def rejected(core: ExchangeCore, cmd: dict, code: str, ts: int = T0) -> Outcome:
    """Apply `cmd`, which must be rejected with `code` and change nothing at all."""
    before, seq, now = core.state_digest(), core.seq, core.ts
    out = core.apply(cmd, ts)
    assert (out.code, out.seq, out.events) == (code, None, []), (cmd, out.code, out.detail)
    assert (core.seq, core.ts) == (seq, now)
    assert core.state_digest() == before
    return out


def duplicate(core: ExchangeCore, cmd: dict, ts: int = T0) -> Outcome:
    """Apply `cmd`, a resend: it must only return the earlier result and change nothing."""
    before, seq = core.state_digest(), core.seq
    out = core.apply(cmd, ts)
    assert (out.code, out.seq, out.events, out.duplicate) == (None, None, [], True), (cmd, out.code)
    assert core.seq == seq and core.state_digest() == before
    return out


def make_core(engine: str, *, cash: tuple = ((2, 1_000_000),), **listing) -> ExchangeCore:
    core = ExchangeCore(engine)
    ok(core, listing_cmd(**listing))
    for account, amount in cash:
        ok(core, deposit(account, amount, f"seed-{account}"))
    return core


def trades(out: Outcome) -> list[tuple]:
    return [e for e in out.events if e[0] == E.EV_TRADE]


def of_kind(out: Outcome, kind: int) -> list[tuple]:
    return [e for e in out.events if e[0] == kind]


# ---- reservations and fills -----------------------------------------------------------------------


@pytest.mark.parametrize(("maker_bp", "taker_bp"), [(20, 5), (5, 20)])
@pytest.mark.parametrize(("lot", "price", "qty", "expected"), [
    (1000, 1234, 3000, 3713),  # ceil(1234 * 3 t * 1.002) = 3710, + 1 fen a lot for fee rounding
    (100, 1234, 300, 377),  # ceil(370.92) = 371, + 2 fen a lot (value and fee rounding)
])
def test_limit_buy_reserves_worst_case_cost_at_the_higher_fee(engine, maker_bp, taker_bp, lot, price, qty, expected):
    need = buy_reservation(price, qty, lot, max(maker_bp, taker_bp))
    assert need == expected
    core = make_core(engine, lot=lot, maker_bp=maker_bp, taker_bp=taker_bp, cash=((2, need - 1),))
    rejected(core, buy(2, price, qty), "insufficient_funds")
    ok(core, deposit(2, 1, "top-up"))
    out = ok(core, buy(2, price, qty))
    assert core.cash[2] == [need, need]
    assert core.orders[out.order_id][O_RESERVED] == need
    assert core.free_cash(2) == 0


def test_fill_consumes_value_and_fee_and_releases_price_improvement(engine):
    core = make_core(engine, maker_bp=5, taker_bp=20)
    ok(core, sell(1, 1000, 1000))
    out = ok(core, buy(2, 1200, 3000))  # takes 1 t at 1000, 2 t rest at 1200
    (t,) = trades(out)
    # value 1000; buyer (taker) fee 20 bp = 2; seller (maker) fee 5 bp = 0.5, rounded half-up to 1
    assert (t[T_ID], t[T_PRICE], t[T_QTY], t[T_VALUE], t[T_BFEE], t[T_SFEE]) == (1, 1000, 1000, 1000, 2, 1)
    assert core.cash[2][0] == 1_000_000 - 1002
    # what stays reserved is exactly the reservation of the 2 t still open at 1200
    assert core.cash[2][1] == core.orders[out.order_id][O_RESERVED] == buy_reservation(1200, 2000, 1000, 20) == 2407
    assert core.cash[1] == [999, 0]
    assert core.position(SYM, 1) == (9000, 0, 0)
    assert core.position(SYM, 2) == (0, 0, 1000)

    # the rest fills as maker at its own price: fee 5 bp of 2400 = 1.2 -> 1; nothing stays reserved
    (t,) = trades(ok(core, sell(1, 1100, 2000)))
    assert (t[T_ID], t[T_PRICE], t[T_QTY], t[T_VALUE], t[T_BFEE], t[T_SFEE]) == (2, 1200, 2000, 2400, 1, 5)
    assert core.cash[2] == [1_000_000 - 1002 - 2401, 0]
    assert core.cash[1] == [999 + 2395, 0]
    assert core.orders == {}


def test_cancel_releases_reservation_and_encumbrance(engine):
    core = make_core(engine, taker_bp=10)
    b = ok(core, buy(2, 900, 2000)).order_id
    s = ok(core, sell(1, 1100, 3000)).order_id
    assert core.cash[2] == [1_000_000, buy_reservation(900, 2000, 1000, 10)]
    assert core.position(SYM, 1) == (7000, 3000, 0)
    out = ok(core, cancel(2, b))
    assert [e[:5] for e in of_kind(out, E.EV_CANCELLED)] == [(E.EV_CANCELLED, SYM, b, 2000, E.CANCEL_USER)]
    assert core.cash[2] == [1_000_000, 0]
    ok(core, cancel(1, s))
    assert core.position(SYM, 1) == (10_000, 0, 0)
    assert core.orders == {}


def test_cancel_after_partial_fill_releases_the_rest(engine):
    core = make_core(engine, maker_bp=3, taker_bp=7)
    b = ok(core, buy(2, 1000, 3000)).order_id
    ok(core, sell(1, 1000, 1000))
    assert core.cash[2][1] == buy_reservation(1000, 2000, 1000, 7)
    ok(core, cancel(2, b))
    assert core.cash[2] == [1_000_000 - 1000 - fee_fen(1000, 3), 0]


def test_ioc_and_market_sell_remainders_are_released(engine):
    core = make_core(engine, taker_bp=20)
    ok(core, sell(1, 1000, 1000))
    out = ok(core, buy(2, 1100, 3000, tif=E.IOC))
    assert len(trades(out)) == 1
    assert [e[2:5] for e in of_kind(out, E.EV_CANCELLED)] == [(out.order_id, 2000, E.CANCEL_UNFILLED)]
    assert core.cash[2] == [1_000_000 - 1002, 0]

    ok(core, buy(2, 1000, 1000))
    out = ok(core, sell(1, 1000, 4000, tif=E.IOC))
    assert [e[2:5] for e in of_kind(out, E.EV_CANCELLED)] == [(out.order_id, 3000, E.CANCEL_UNFILLED)]
    assert core.position(SYM, 1) == (8000, 0, 0)

    ok(core, buy(2, 990, 1000))
    out = ok(core, market(1, E.ASK, 3000))
    assert [e[2:5] for e in of_kind(out, E.EV_CANCELLED)] == [(out.order_id, 2000, E.CANCEL_UNFILLED)]
    assert core.position(SYM, 1) == (7000, 0, 0)
    assert core.orders == {}
    assert core.cash[2][1] == 0


def test_market_buy_reserves_its_cap_plus_fees_and_holds_nothing_afterwards(engine):
    need = market_buy_reservation(1500, 5000, 1000, 20)
    assert need == 1500 + 3 + 5  # the cap, 20 bp of it rounded up, 1 fen a lot for fee rounding
    core = make_core(engine, taker_bp=20, cash=((2, need - 1),))
    ok(core, sell(1, 1000, 1000))
    ok(core, sell(1, 1050, 1000))
    rejected(core, market(2, E.BID, 5000, cash_cap=1500), "insufficient_funds")
    ok(core, deposit(2, 1, "top-up"))
    out = ok(core, market(2, E.BID, 5000, cash_cap=1500))
    (t,) = trades(out)  # 1 t at 1000; the remaining 500 fen cannot buy a tonne at 1050
    assert (t[T_PRICE], t[T_QTY], t[T_VALUE], t[T_BFEE]) == (1000, 1000, 1000, 2)
    assert [e[2:5] for e in of_kind(out, E.EV_CANCELLED)] == [(out.order_id, 4000, E.CANCEL_CASH_CAP)]
    assert core.cash[2] == [need - 1002, 0]

    # filled in full: the unused part of the reservation goes back too
    ok(core, deposit(2, 10_000, "more"))
    out = ok(core, market(2, E.BID, 1000, cash_cap=5000))
    assert [t[T_QTY] for t in trades(out)] == [1000]
    assert core.cash[2] == [need - 1002 + 10_000 - 1050 - 2, 0]
    rejected(core, market(2, E.BID, 1000, cash_cap=0), "invalid_order")


def test_a_buy_that_never_rests_needs_only_what_it_meets_in_the_book(engine):
    """On a 1 kg lot the worst case allows 2 fen a kilogram for rounding: 1.932 t at 13.89 CNY/t
    costs 26.84 + 0.03 fee = 26.87 CNY, and the reservation asked for 64.31. A buy that never
    rests (IOC, FOK) is now held to what it meets in the book, exactly, so a buyer with just the
    cost buys (review31); a GTC buy, which may rest and fill later, still needs the worst case."""
    core = make_core(engine, cash=((2, 2687),), lot=1, reference_price=1389, taker_bp=10,
                     holdings=((1, 10_000),))
    ok(core, sell(1, 1389, 1932))
    rejected(core, buy(2, 1389, 1932), "insufficient_funds")
    out = ok(core, buy(2, 1389, 1932, tif=E.FOK))
    assert [(e[8], e[9], e[10], e[11]) for e in trades(out)] == [(1389, 1932, 2684, 3)]
    assert core.cash[2] == [0, 0] and core.position(SYM, 2)[2] == 1932
    # One fen short of the cost: refused, nothing changed; an IOC is held to what it meets too.
    core = make_core(engine, cash=((2, 2686),), lot=1, reference_price=1389, taker_bp=10, holdings=((1, 10_000),))
    ok(core, sell(1, 1389, 1932))
    before = core.state_digest()
    rejected(core, buy(2, 1389, 1932, tif=E.FOK), "insufficient_funds")
    assert core.state_digest() == before
    out = ok(core, buy(2, 1389, 1000, tif=E.IOC))  # 13.89 + 0.01
    assert core.cash[2] == [2686 - 1390, 0] and core.check_invariants() == []


def test_insufficient_funds_and_credits_change_nothing(engine):
    core = make_core(engine, cash=((2, 1000),))
    ok(core, sell(1, 1000, 6000))
    rejected(core, sell(1, 1000, 5000), "insufficient_credits")
    rejected(core, sell(3, 1000, 1000), "insufficient_credits")  # no position at all
    rejected(core, market(3, E.ASK, 1000), "insufficient_credits")
    rejected(core, buy(2, 1001, 1000), "insufficient_funds")
    rejected(core, buy(3, 1000, 1000), "insufficient_funds")  # no cash at all
    rejected(core, market(2, E.BID, 1000, cash_cap=1001), "insufficient_funds")


def test_book_rejects_give_the_reservation_back(engine):
    core = make_core(engine, maker_bp=10, taker_bp=10)
    ok(core, sell(1, 1000, 1000))
    rejected(core, buy(2, 1000, 1000, post_only=True), "post_only_would_take")
    rejected(core, buy(2, 1000, 2000, tif=E.FOK), "fok_not_fillable")
    ok(core, buy(2, 900, 1000))
    rejected(core, sell(1, 900, 1000, post_only=True), "post_only_would_take")
    rejected(core, sell(1, 800, 2000, tif=E.FOK), "fok_not_fillable")
    assert core.position(SYM, 1) == (9000, 1000, 0)


def test_fees_round_half_up_by_role(engine):
    core = make_core(engine, maker_bp=10, taker_bp=30)
    ok(core, sell(1, 1500, 1000))
    (t,) = trades(ok(core, buy(2, 1500, 1000)))  # the buyer takes: 30 bp of 1500 = 4.5 -> 5, 10 bp = 1.5 -> 2
    assert (t[T_SIDE], t[T_VALUE], t[T_BFEE], t[T_SFEE]) == (E.BID, 1500, 5, 2)
    ok(core, buy(2, 1500, 1000))
    (t,) = trades(ok(core, sell(1, 1500, 1000)))  # the seller takes
    assert (t[T_SIDE], t[T_VALUE], t[T_BFEE], t[T_SFEE]) == (E.ASK, 1500, 2, 5)
    assert core.cash[1] == [1498 + 1495, 0]
    assert core.cash[2] == [1_000_000 - 1505 - 1502, 0]


def test_trade_value_rounds_half_up(engine):
    core = make_core(engine, lot=100)
    ok(core, sell(1, 1005, 100))
    (t,) = trades(ok(core, buy(2, 1005, 100)))
    assert t[T_VALUE] == 101  # 100.5 fen
    ok(core, sell(1, 1004, 100))
    (t,) = trades(ok(core, buy(2, 1004, 100)))
    assert t[T_VALUE] == 100  # 100.4 fen
    assert core.cash[1] == [201, 0]


# ---- T+1 --------------------------------------------------------------------------------------------


def test_t1_bought_credits_are_sellable_from_the_next_shanghai_day(engine):
    core = make_core(engine)
    ok(core, sell(1, 1000, 2000))
    ok(core, buy(2, 1000, 2000))
    assert core.position(SYM, 2) == (0, 0, 2000)
    rejected(core, sell(2, 1100, 1000), "insufficient_credits", local_ts(2024, 3, 4, 23, 59))
    rejected(core, market(2, E.ASK, 1000), "insufficient_credits", local_ts(2024, 3, 4, 23, 59))
    # 07:00 on Tuesday in Shanghai is still Monday (23:00) in UTC: the Shanghai calendar decides
    tue = local_ts(2024, 3, 5, 7, 0)
    assert trading_day(tue) == trading_day(T0) + 1 and (tue // 86_400_000_000) == (T0 // 86_400_000_000)
    ok(core, sell(2, 1100, 1000), tue)
    assert core.position(SYM, 2) == (1000, 1000, 0)
    # bought on Tuesday: locked again, while Monday's purchase stays sellable
    ok(core, sell(1, 1000, 1000), tue)
    ok(core, buy(2, 1000, 1000), tue)
    assert core.position(SYM, 2) == (1000, 1000, 1000)
    rejected(core, sell(2, 1100, 2000), "insufficient_credits", tue)
    ok(core, sell(2, 1100, 1000), tue)
    rejected(core, sell(2, 1100, 1000), "insufficient_credits", local_ts(2024, 3, 5, 23, 59))
    ok(core, sell(2, 1100, 1000), local_ts(2024, 3, 6, 0, 0))
    assert core.position(SYM, 2) == (0, 3000, 0)


def test_t1_lock_rolls_over_when_buying_again_days_later(engine):
    core = make_core(engine)
    ok(core, sell(1, 1000, 2000))
    ok(core, buy(2, 1000, 2000))
    wed = local_ts(2024, 3, 6, 10, 0)
    ok(core, sell(1, 1000, 1000), wed)
    ok(core, buy(2, 1000, 1000), wed)  # Monday's lock ends, Wednesday's begins
    assert core.position(SYM, 2) == (2000, 0, 1000)
    rejected(core, sell(2, 1100, 3000), "insufficient_credits", wed)
    ok(core, sell(2, 1100, 2000), wed)
    # an amend up cannot reach Wednesday's credits either
    oid = max(core.orders)
    rejected(core, amend(2, oid, 1100, 3000), "insufficient_credits", wed)
    ok(core, amend(2, oid, 1100, 3000), local_ts(2024, 3, 7, 0, 0))
    assert core.position(SYM, 2) == (0, 3000, 0)


def test_without_t1_bought_credits_are_sellable_at_once(engine):
    core = make_core(engine, t1=False)
    ok(core, sell(1, 1000, 2000))
    ok(core, buy(2, 1000, 2000))
    assert core.position(SYM, 2) == (2000, 0, 0)
    ok(core, sell(2, 1100, 2000))
    assert core.position(SYM, 2) == (0, 2000, 0)


# ---- idempotency ------------------------------------------------------------------------------------


def test_client_order_id_resend_returns_the_original_order(engine):
    core = make_core(engine, cash=((2, 1_000_000), (3, 1_000_000)))
    first = ok(core, buy(2, 1000, 1000, coid="abc"))
    assert duplicate(core, buy(2, 1000, 1000, coid="abc")).order_id == first.order_id
    rejected(core, buy(2, 1001, 1000, coid="abc"), "duplicate_client_order_id")
    rejected(core, buy(2, 1000, 2000, coid="abc"), "duplicate_client_order_id")
    rejected(core, {**buy(2, 1000, 1000, coid="abc"), "symbol": "OTHER"}, "unknown_instrument")
    for changed in ({"tif": E.IOC}, {"tif": E.FOK}, {"post_only": True}, {"tif": E.GTD, "expire_ts": T0 + HOUR}):
        rejected(core, buy(2, 1000, 1000, coid="abc", **changed), "duplicate_client_order_id")
    assert duplicate(core, buy(2, 1000, 1000, coid="abc", tif=E.GTC, post_only=False)).order_id == first.order_id
    gtd = ok(core, buy(2, 990, 1000, coid="gtd", tif=E.GTD, expire_ts=T0 + HOUR))
    assert duplicate(core, buy(2, 990, 1000, coid="gtd", tif=E.GTD, expire_ts=T0 + HOUR)).order_id == gtd.order_id
    rejected(core, buy(2, 990, 1000, coid="gtd", tif=E.GTD, expire_ts=T0 + 2 * HOUR), "duplicate_client_order_id")
    mkt = ok(core, {**market(2, E.BID, 1000, cash_cap=5000), "coid": "mkt"})
    assert duplicate(core, {**market(2, E.BID, 1000, cash_cap=5000), "coid": "mkt"}).order_id == mkt.order_id
    rejected(core, {**market(2, E.BID, 1000, cash_cap=6000), "coid": "mkt"}, "duplicate_client_order_id")
    other = ok(core, buy(3, 1000, 1000, coid="abc"))  # client order ids are per account
    assert other.order_id != first.order_id
    ok(core, cancel(2, first.order_id))
    # still the same order once it has left the book, even while halted
    ok(core, {"op": "halt", "symbol": SYM})
    assert duplicate(core, buy(2, 1000, 1000, coid="abc")).order_id == first.order_id


def test_a_snapshot_from_before_the_terms_were_kept_still_restores(engine):
    """Snapshots written before a client order id kept all terms and its mark hold six fields:
    those compare on symbol, side, kind, price and quantity, and are forgotten by the roll."""
    core = make_core(engine)
    first = ok(core, buy(2, 1000, 1000, coid="old"))
    state = orjson.loads(core.snapshot())
    state["coids"] = [row[:8] for row in state["coids"]]  # account, coid and the six old fields
    old = ExchangeCore.restore(orjson.dumps(state), engine)
    assert duplicate(old, buy(2, 1000, 1000, coid="old", tif=E.IOC)).order_id == first.order_id
    rejected(old, buy(2, 1001, 1000, coid="old"), "duplicate_client_order_id")
    assert old.check_invariants() == []


def test_client_order_ids_of_closed_orders_are_forgotten_at_the_second_close(engine):
    """A client_order_id lives while its order is open and, after the order closed, until the
    second day's close (roll) after that; an open order's lives on, and offset:KEY for good. The
    marks survive a snapshot."""
    core = make_core(engine, cash=((2, 10_000_000),))
    day = 24 * HOUR
    filled = ok(core, buy(2, 1000, 1000, coid="filled"))
    ok(core, sell(1, 1000, 1000))  # fills it: closed on day 0, whose trade makes a close due
    resting = ok(core, buy(2, 900, 1000, coid="resting"))
    ok(core, sell(1, 1000, 1000))
    offset = ok(core, buy(2, 1000, 1000, coid="offset:k1", tif=E.FOK))
    ok(core, {"op": "roll"}, T0 + day)  # day 0 closes: "filled" is marked, still known
    assert duplicate(core, buy(2, 1000, 1000, coid="filled"), T0 + day).order_id == filled.order_id
    rejected(core, buy(2, 1001, 1000, coid="filled"), "duplicate_client_order_id", T0 + day)
    restored = ExchangeCore.restore(core.snapshot(), engine)
    for c in (core, restored):
        ok(c, sell(1, 1000, 1000), T0 + day)
        ok(c, buy(2, 1000, 1000), T0 + day)  # a trade on day 1, so day 1 closes too
        ok(c, {"op": "roll"}, T0 + 2 * day)
        assert set(c.coids[2]) == {"resting", "offset:k1"}
    assert core.state_digest() == restored.state_digest()
    again = ok(core, buy(2, 1001, 1000, coid="filled"), T0 + 2 * day)  # free again: a new order
    assert again.order_id != filled.order_id
    assert duplicate(core, buy(2, 900, 1000, coid="resting"), T0 + 2 * day).order_id == resting.order_id
    assert duplicate(core, buy(2, 1000, 1000, coid="offset:k1", tif=E.FOK),
                     T0 + 2 * day).order_id == offset.order_id


def test_a_days_close_cancels_the_orders_its_new_band_leaves_outside(engine):
    """The close moves the band (reference price 10.00 +-10 %, a day's VWAP of 10.80: 9.72 to
    11.88). A roll with cancel_outside_band cancels the bid resting at 9.05, now below the band,
    with reason price_band and its cash free again; one inside stays. Without it (rolls journaled
    before) the bid stays, and a market sell would take it at a price no new order may name."""
    for sweep, left in ((True, False), (False, True)):
        core = make_core(engine, cash=((2, 10_000_000),), reference_price=1000, band_bp=1000, t1=False)
        low = ok(core, buy(2, 905, 1000))
        ok(core, sell(1, 1080, 2000))
        ok(core, buy(2, 1080, 1000))  # the day's only trade: the close is 10.80
        inside = ok(core, sell(1, 1095, 1000))
        reserved = core.cash[2][1]
        out = ok(core, {"op": "roll", "cancel_outside_band": sweep}, T0 + 24 * HOUR)
        assert core.listings[SYM].rules.band() == (972, 1188)
        assert (low.order_id in core.orders) == left and inside.order_id in core.orders
        cancels = [e for e in out.events if e[0] == E.EV_CANCELLED]
        if sweep:
            assert [(e[2], e[4]) for e in cancels] == [(low.order_id, E.CANCEL_PRICE_BAND)]
            assert core.cash[2][1] == reserved - buy_reservation(905, 1000, 1000, 0)
        else:
            assert cancels == []
    ok(core, buy(2, 1095, 1000), T0 + 24 * HOUR)  # a trade on day 1: its close is due on day 2
    out = rejected(core, {"op": "roll", "cancel_outside_band": 1}, "invalid_command", T0 + 48 * HOUR)
    assert "true or false" in out.detail


def test_a_close_keeps_the_band_at_least_one_tick_either_way(engine):
    """Tick 1.00, reference 10.00, band 10 %: the day trades at 9.00, and 9.00 +-10 % (8.10 to
    9.90) holds no price but 9.00 on the tick grid. A roll with tick_floor (every roll the
    service journals now) makes the band 8.00 to 10.00, and a sell resting at 10.00 stays; a
    roll journaled before it replays as it ran: the band is 9.00 to 9.00 and the sell is swept.
    A listing with tick_floor has it from the start; the wire leaves it out when false, as
    listings journaled before it were written."""
    for floor, band, left in ((True, (800, 1000), True), (False, (900, 900), False)):
        core = make_core(engine, cash=((2, 10_000_000),), tick=100, reference_price=1000, band_bp=1000, t1=False)
        ok(core, sell(1, 900, 1000))
        ok(core, buy(2, 900, 1000))
        high = ok(core, sell(1, 1000, 1000))
        ok(core, {**ROLL, "tick_floor": floor}, T0 + 24 * HOUR)
        rules = core.listings[SYM].rules
        assert (rules.reference_price, rules.band(), rules.tick_floor) == (900, band, floor)
        assert (high.order_id in core.orders) == left
        assert ("tick_floor" in core.listings[SYM].to_wire()["rules"]) == floor
        if floor:
            ok(core, sell(1, 800, 1000), T0 + 24 * HOUR)
            ok(core, sell(1, 1000, 1000), T0 + 24 * HOUR)
            rejected(core, sell(1, 1100, 1000), "price_out_of_band", T0 + 24 * HOUR)
    core = make_core(engine, tick=100, reference_price=1000, band_bp=100, tick_floor=True)
    assert core.listings[SYM].rules.band() == (900, 1100)  # 9.90 to 10.10 alone holds only 10.00
    assert make_core(engine, tick=5, reference_price=3505, band_bp=50).listings[SYM].rules.band() == (3490, 3520)
    rejected(ExchangeCore(engine), listing_cmd(tick_floor=1), "invalid_rules")
    rejected(core, {**ROLL, "tick_floor": "yes"}, "invalid_command", T0 + 48 * HOUR)


def test_a_give_back_after_a_snapshot_relocks_as_it_would_have(engine):
    """A take empties a position bought today ([0, 0, 0, today]); a snapshot is written; the
    give-back relocks. The snapshot keeps the empty position's day, so the restored core relocks
    too (it dropped the position, and a restart made today's purchase sellable)."""
    core = make_core(engine)
    ok(core, sell(1, 1000, 1000))
    ok(core, buy(2, 1000, 1000))
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -1000]]})
    restored = ExchangeCore.restore(core.snapshot(), engine)
    for c in (core, restored):
        ok(c, {"op": "adjust", "credits": [[SYM, 2, 1000, 1000]]})
        assert c.position(SYM, 2) == (0, 0, 1000)
    assert restored.state_digest() == core.state_digest()


def test_self_trade_prevention_is_set_per_account_and_survives_a_snapshot(engine):
    """DESIGN: cancel the resting order or the incoming one, configurable per account. The
    default cancels the resting order; stp mode 2 cancels the incoming one, 3 both; the setting
    is journaled state, kept by a snapshot, and another account's is its own."""
    core = make_core(engine, cash=((1, 10_000_000), (2, 10_000_000)))
    resting = ok(core, sell(1, 1000, 1000))
    out = ok(core, buy(1, 1000, 1000))  # default: the resting sell goes, the buy rests
    assert resting.order_id not in core.orders and out.order_id in core.orders
    ok(core, cancel(1, out.order_id))
    assert ok(core, {"op": "stp", "account": 1, "mode": E.STP_CANCEL_INCOMING}).events == [(36, 1, 2)]
    core = ExchangeCore.restore(core.snapshot(), engine)
    resting = ok(core, sell(1, 1000, 1000))
    out = ok(core, buy(1, 1000, 1000))  # now the incoming buy goes and the sell keeps its place
    assert resting.order_id in core.orders and out.order_id not in core.orders
    assert [e[4] for e in out.events if e[0] == E.EV_CANCELLED] == [E.CANCEL_SELF_TRADE]
    traded = ok(core, buy(2, 1000, 1000))  # account 2 is not account 1: it trades
    assert trades(traded)
    for bad in ({"account": 1, "mode": 0}, {"account": 1, "mode": 4}, {"account": 1, "mode": True},
                {"account": 0, "mode": 2}, {"account": 1}):
        rejected(core, {"op": "stp", **bad}, "invalid_command")
    ok(core, {"op": "stp", "account": 1, "mode": E.STP_CANCEL_RESTING})
    assert core.stp == {}


def test_a_give_back_returns_todays_purchase_locked_while_its_day_lasts(engine):
    """adjust's relock: of a positive credits delta, the kg that go back to bought-today credits
    while that day lasts (later they would be free anyway); 0 <= relock <= delta."""
    core = make_core(engine, cash=((2, 10_000_000),))
    ok(core, sell(1, 1000, 3000))
    ok(core, buy(2, 1000, 3000))  # locked today (T+1)
    assert core.position(SYM, 2) == (0, 0, 3000)
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -2000]]})  # a retirement's take
    assert core.position(SYM, 2) == (0, 0, 1000)
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 2000, 2000]]})  # its give-back
    assert core.position(SYM, 2) == (0, 0, 3000)
    rejected(core, sell(2, 1000, 1000), "insufficient_credits")
    for bad in ([SYM, 2, 1000, 1001], [SYM, 2, 1000, -1], [SYM, 2, 1000, 1.5], [SYM, 2, 1000, 0, 0]):
        rejected(core, {"op": "adjust", "credits": [bad]}, "invalid_command")
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -3000]]})
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 3000, 3000]]}, T0 + 24 * HOUR)  # a day later: free
    assert core.position(SYM, 2)[0] + core.position(SYM, 2)[2] == 3000
    ok(core, sell(2, 1000, 3000), T0 + 24 * HOUR)


def test_an_unfreeze_on_the_day_of_the_freeze_gives_todays_purchase_back_locked(engine):
    """A freeze takes available credits first, then bought-today ones; an unfreeze the same day
    gives those back locked (T+1), however it is split, and never more than the freeze took of
    them. Without ``frozen`` the give-back made the day's purchase sellable at once."""
    core = make_core(engine, cash=((2, 10_000_000),))
    ok(core, sell(1, 1000, 2000))
    ok(core, buy(2, 1000, 2000))  # Monday: sellable on Tuesday
    tue = T0 + 24 * HOUR
    ok(core, {"op": "roll", "cancel_outside_band": True}, tue)
    ok(core, sell(1, 1000, 3000), tue)
    ok(core, buy(2, 1000, 3000), tue)  # Tuesday: locked
    assert core.position(SYM, 2, tue) == (2000, 0, 3000)
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -4000]], "frozen": True}, tue)  # 2 t free, 2 t of today's
    assert core.position(SYM, 2, tue) == (0, 0, 1000)
    assert core.frozen_locked == {(SYM, 2): [trading_day(tue), 2000]}
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 1500]], "frozen": True}, tue)  # part of the unfreeze
    assert core.position(SYM, 2, tue) == (0, 0, 2500)
    restored = ExchangeCore.restore(core.snapshot(), engine)
    assert restored.state_digest() == core.state_digest() and restored.frozen_locked == core.frozen_locked
    for c in (core, restored):
        ok(c, {"op": "adjust", "credits": [[SYM, 2, 2500]], "frozen": True}, tue)  # the rest: 500 kg locked
        assert c.position(SYM, 2, tue) == (2000, 0, 3000) and c.frozen_locked == {}
        rejected(c, sell(2, 1100, 3000), "insufficient_credits", tue)
        ok(c, sell(2, 1100, 2000), tue)
    assert restored.state_digest() == core.state_digest()
    rejected(core, {"op": "adjust", "credits": [[SYM, 2, 1]], "frozen": 1}, "invalid_command", tue)


def test_what_a_freeze_took_of_todays_purchase_is_forgotten_when_the_day_ends(engine):
    """Frozen on Monday, unfrozen on Tuesday: Monday's purchase is free by then, and the next
    roll drops what was remembered (snapshots do not carry it for ever). A give-back with its own
    relock (a refused freeze's) uses the remembered kg up."""
    core = make_core(engine, cash=((2, 10_000_000),))
    ok(core, sell(1, 1000, 3000))
    ok(core, buy(2, 1000, 3000))
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -3000]], "frozen": True})
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 1000, 1000]], "frozen": True})  # a refused part goes back
    assert core.frozen_locked == {(SYM, 2): [trading_day(T0), 2000]}
    tue = T0 + 24 * HOUR
    ok(core, {"op": "roll", "cancel_outside_band": True}, tue)
    assert core.frozen_locked == {}
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 2000]], "frozen": True}, tue)
    assert core.position(SYM, 2, tue) == (3000, 0, 0)
    ok(core, sell(2, 1100, 3000), tue)


def test_a_freeze_on_the_next_day_before_its_roll_remembers_only_that_days_purchase(engine):
    """Monday's freeze took 2 t bought on Monday; on Tuesday, before the roll (commands can
    come first), 1 t is bought and a freeze of everything takes it: an unfreeze gives back only
    Tuesday's 1 t locked, Monday's are free by then."""
    core = make_core(engine, cash=((2, 10_000_000),), holdings=((1, 10_000), (2, 1000)))
    ok(core, sell(1, 1000, 2000))
    ok(core, buy(2, 1000, 2000))
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -3000]], "frozen": True})  # 1 t free, 2 t of Monday's
    tue = T0 + 24 * HOUR
    assert core.roll_due(tue)
    ok(core, sell(1, 1000, 1000), tue)
    ok(core, buy(2, 1000, 1000), tue)
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -1000]], "frozen": True}, tue)
    assert core.frozen_locked == {(SYM, 2): [trading_day(tue), 1000]}
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 4000]], "frozen": True}, tue)
    assert core.position(SYM, 2, tue) == (3000, 0, 1000)


def test_what_is_left_frozen_caps_what_is_remembered(engine):
    """A cancel of frozen credits leaves less frozen than a freeze took of the day's purchase:
    ``frozen_left`` caps the remembered kg at what is left (review28), replays and restores alike,
    and is refused when malformed, changing nothing."""
    core = make_core(engine, cash=((2, 10_000_000),))
    ok(core, sell(1, 1000, 3000))
    ok(core, buy(2, 1000, 3000))
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -3000]], "frozen": True})
    assert core.frozen_locked == {(SYM, 2): [trading_day(T0), 3000]}
    for bad in ([[SYM, 2, -1]], [[SYM, 2]], [["NOPE-2024", 2, 0]], [[SYM, 2, 1.5]], {SYM: 1}):
        rejected(core, {"op": "adjust", "frozen_left": bad}, "invalid_command")
    assert ok(core, {"op": "adjust", "frozen_left": [[SYM, 2, 5000]]}).events == []  # more than remembered
    ok(core, {"op": "adjust", "frozen_left": [[SYM, 2, 1000]]})
    assert core.frozen_locked == {(SYM, 2): [trading_day(T0), 1000]}
    assert ExchangeCore.restore(core.snapshot(), engine).frozen_locked == core.frozen_locked
    ok(core, {"op": "adjust", "frozen_left": [[SYM, 2, 0]]})
    assert core.frozen_locked == {}
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 1000]], "frozen": True})  # nothing left to relock
    assert core.position(SYM, 2, T0) == (1000, 0, 0)


def test_a_take_of_todays_purchase_is_remembered_until_given_back_or_the_day_ends(engine):
    """``take`` marks the service's take for a registry change: what it took of bought-today
    credits is remembered under its seq (the next start gives it back locked if the registry
    never made the change); ``gives_back`` forgets it, as does the day's roll. A take of nothing
    bought today is not remembered. Snapshots carry it, and malformed marks change nothing."""
    core = make_core(engine, cash=((2, 10_000_000),), holdings=((1, 10_000), (2, 1000)))
    ok(core, sell(1, 1000, 3000))
    ok(core, buy(2, 1000, 3000))  # locked today; 1 t older
    ok(core, {"op": "adjust", "credits": [[SYM, 2, -1000]], "take": True})  # the older tonne only
    assert core.locked_takes == {}
    out = ok(core, {"op": "adjust", "credits": [[SYM, 2, -2000, 2000]], "take": True, "cause": "retirement"})
    assert core.locked_takes == {out.seq: [trading_day(T0), False, [[SYM, 2, 2000, 2000]]]}
    frozen = ok(core, {"op": "adjust", "credits": [[SYM, 2, -1000]], "take": True, "frozen": True})
    assert core.locked_takes[frozen.seq] == [trading_day(T0), True, [[SYM, 2, 1000, 1000]]]
    restored = ExchangeCore.restore(core.snapshot(), engine)
    assert restored.locked_takes == core.locked_takes and restored.state_digest() == core.state_digest()
    for bad in ({"take": 1}, {"gives_back": 0}, {"gives_back": core.seq + 1}, {"gives_back": "5"},
                {"take": True, "gives_back": out.seq}):
        rejected(core, {"op": "adjust", "credits": [[SYM, 2, 1]], **bad}, "invalid_command")
    ok(core, {"op": "adjust", "credits": [[SYM, 2, 2000, 2000]], "gives_back": out.seq})
    assert list(core.locked_takes) == [frozen.seq] and core.position(SYM, 2) == (0, 0, 2000)
    digest = core.state_digest()
    ok(core, {"op": "roll", "cancel_outside_band": True}, T0 + 24 * HOUR)
    assert core.locked_takes == {} and core.state_digest() != digest


FREEZE_OPS = st.lists(st.tuples(st.sampled_from(("buy", "sell", "freeze", "unfreeze", "snapshot", "next day")),
                                st.integers(0, 4)), max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=FREEZE_OPS)
def test_freezes_and_unfreezes_never_free_todays_purchase(ops):
    """Buys, resting sells, freezes of some or all of a position and unfreezes of some or all of
    what is frozen, in any order over a day or two, on both engines and across snapshots: what
    the buyer may sell is always exactly what it holds, less its open sells, less what it bought
    that day (T+1), and what the core remembers never exceeds what is frozen."""
    engines = ("cython", "reference")
    cores = [make_core(e, cash=((2, 10_000_000),), holdings=((1, 100_000), (2, 5_000))) for e in engines]
    frozen = bought = 0
    ts = T0
    for op, n in ops:
        core = cores[0]
        available, encumbered, locked = core.position(SYM, 2, ts)
        cmd = None
        if op == "buy" and n:
            ok(core, sell(1, 1000, n * 1000), ts)  # rests until the buy takes it
            for c in cores[1:]:
                ok(c, sell(1, 1000, n * 1000), ts)
            cmd, bought = buy(2, 1000, n * 1000), bought + n * 1000
        elif op == "sell" and n and n * 1000 <= available:
            cmd = sell(2, 1050, n * 1000)  # rests: the buys below take account 1's at 1000
        elif op == "freeze" and available + locked:
            kg = min(n * 1000, available + locked) if n else available + locked
            cmd, frozen = {"op": "adjust", "credits": [[SYM, 2, -kg]], "frozen": True}, frozen + kg
        elif op == "unfreeze" and frozen:
            kg = min(n * 1000, frozen) if n else frozen
            cmd, frozen = {"op": "adjust", "credits": [[SYM, 2, kg]], "frozen": True}, frozen - kg
        elif op == "snapshot":
            cores = [ExchangeCore.restore(c.snapshot(), e) for c, e in zip(cores, engines, strict=True)]
        elif op == "next day":
            ts, bought = ts + 24 * HOUR, 0
            if core.roll_due(ts) and n % 2:  # or not yet: the day check stands without the roll
                cmd = {"op": "roll", "cancel_outside_band": True}
        if cmd is not None:
            for c in cores:
                ok(c, cmd, ts)
        assert len({c.state_digest() for c in cores}) == 1
        core = cores[0]
        available, encumbered, locked = core.position(SYM, 2, ts)
        held = available + encumbered + locked
        assert available == max(0, held - encumbered - bought), (op, n, core.credits[SYM][2], frozen, bought)
        remembered = core.frozen_locked.get((SYM, 2))
        assert remembered is None or 0 < remembered[1] <= frozen


def test_payments_are_idempotent_by_reference(engine):
    core = make_core(engine, cash=())
    out = ok(core, deposit(2, 500, "d1"))
    assert out.events == [(EV_DEPOSIT, 2, 500, "d1")]
    duplicate(core, deposit(2, 500, "d1"))
    rejected(core, deposit(2, 600, "d1"), "duplicate_reference")
    rejected(core, deposit(3, 500, "d1"), "duplicate_reference")
    rejected(core, withdraw(2, 500, "d1"), "duplicate_reference")
    out = ok(core, withdraw(2, 200, "w1"))
    assert out.events == [(EV_WITHDRAWAL, 2, 200, "w1")]
    duplicate(core, withdraw(2, 200, "w1"))
    rejected(core, withdraw(2, 100, "w1"), "duplicate_reference")
    rejected(core, deposit(2, 200, "w1"), "duplicate_reference")
    assert core.cash[2] == [300, 0]
    # what the ledger's CHECK (btrim length 1..100) would refuse after the journal took it
    for ref in (" ", "   ", "x" * 101, "", "a\x00b"):
        rejected(core, deposit(2, 100, ref), "invalid_command")
    ok(core, deposit(2, 100, " padded "))


def test_members_cash_together_stays_within_what_the_ledger_holds(engine):
    """Deposits each within MAX_CASH are refused once the cash members hold together would pass
    MAX_HELD_CASH: the custody account (minus all of it, in bigint) could not take them, and the
    projector would stop on every start (review32). A refusal changes nothing."""
    core = make_core(engine, cash=())
    for i in range(MAX_HELD_CASH // MAX_CASH):
        ok(core, deposit(2 + i % 3, MAX_CASH, f"big-{i}"))
    assert sum(p[0] for p in core.cash.values()) == MAX_HELD_CASH
    seq, cash = core.seq, {a: list(p) for a, p in core.cash.items()}
    out = rejected(core, deposit(5, 1, "one-fen-more"), "cash_limit")
    assert "past" in out.detail and core.seq == seq and core.cash == cash and "one-fen-more" not in core.payments
    ok(core, withdraw(2, 10, "w-10"))
    ok(core, deposit(5, 10, "back-to-the-limit"))
    rejected(core, deposit(5, 1, "one-fen-more"), "cash_limit")


def test_withdrawal_is_limited_to_balance_minus_reserved(engine):
    core = make_core(engine, cash=((2, 10_000),))
    ok(core, buy(2, 1000, 3000))  # reserves exactly 3000 (no fee, whole tonnes)
    rejected(core, withdraw(2, 7001, "w1"), "insufficient_funds")
    ok(core, withdraw(2, 7000, "w1"))
    assert core.cash[2] == [3000, 3000]
    rejected(core, withdraw(2, 1, "w2"), "insufficient_funds")
    rejected(core, withdraw(3, 1, "w3"), "insufficient_funds")  # no account yet


# ---- GTD, amend, halt, ownership, listing -----------------------------------------------------------


def test_gtd_orders_expire_through_the_expire_command_only(engine):
    core = make_core(engine, taker_bp=10)
    at = T0 + 5 * MINUTE
    b = ok(core, buy(2, 900, 2000, tif=E.GTD, expire_ts=at)).order_id
    s = ok(core, sell(1, 1100, 3000, tif=E.GTD, expire_ts=at + MINUTE)).order_id
    assert not core.expiry_due(at - 1) and core.expiry_due(at)
    rejected(core, EXPIRE, "invalid_command", at - 1)
    out = ok(core, EXPIRE, at)
    assert [e[:4] for e in of_kind(out, E.EV_EXPIRED)] == [(E.EV_EXPIRED, SYM, b, 2000)]
    assert core.cash[2] == [1_000_000, 0]
    assert list(core.orders) == [s]
    assert not core.expiry_due(at)
    rejected(core, EXPIRE, "invalid_command", at)
    out = ok(core, EXPIRE, at + 2 * MINUTE)
    assert [e[:4] for e in of_kind(out, E.EV_EXPIRED)] == [(E.EV_EXPIRED, SYM, s, 3000)]
    assert core.position(SYM, 1) == (10_000, 0, 0)
    assert core.orders == {}
    rejected(core, buy(2, 900, 1000, tif=E.GTD, expire_ts=at + 2 * MINUTE), "invalid_expiry", at + 2 * MINUTE)


def test_expire_with_nothing_due_is_rejected(engine):
    core = make_core(engine)
    rejected(core, EXPIRE, "invalid_command")
    ok(core, buy(2, 900, 1000, tif=E.GTD, expire_ts=T0 + MINUTE))
    b = ok(core, buy(2, 900, 1000, tif=E.GTD, expire_ts=T0 + 2 * MINUTE)).order_id
    ok(core, cancel(2, b))  # a cancelled GTD order is not due any more
    ok(core, EXPIRE, T0 + MINUTE)
    assert not core.expiry_due(T0 + 10 * MINUTE)
    rejected(core, EXPIRE, "invalid_command", T0 + 10 * MINUTE)


def test_amend_needing_more_cash_than_free_is_rejected(engine):
    need = buy_reservation(1000, 2000, 1000, 10)
    core = make_core(engine, taker_bp=10, cash=((2, need + 5),))
    oid = ok(core, buy(2, 1000, 2000)).order_id
    rejected(core, amend(2, oid, 1000, 3000), "insufficient_funds")
    rejected(core, amend(2, oid, 1010, 2000), "insufficient_funds")
    ok(core, amend(2, oid, 1002, 2000))  # 2 fen more per tonne fits in the 5 fen free
    ok(core, amend(2, oid, 900, 2000))
    assert core.cash[2][1] == core.orders[oid][O_RESERVED] == buy_reservation(900, 2000, 1000, 10)
    ok(core, amend(2, oid, 900, 1000))
    assert core.cash[2][1] == buy_reservation(900, 1000, 1000, 10)

    s = ok(core, sell(1, 1100, 4000)).order_id
    rejected(core, amend(1, s, 1100, 11_000), "insufficient_credits")
    ok(core, amend(1, s, 1100, 10_000))
    assert core.position(SYM, 1) == (0, 10_000, 0)
    ok(core, amend(1, s, 1100, 1000))
    assert core.position(SYM, 1) == (9000, 1000, 0)


def test_halt_rejects_orders_and_amends_but_not_cancels(engine):
    core = make_core(engine)
    oid = ok(core, buy(2, 1000, 1000)).order_id
    ok(core, {"op": "halt", "symbol": SYM})
    rejected(core, buy(2, 1000, 1000), "halted")
    rejected(core, sell(1, 1000, 1000), "halted")
    rejected(core, amend(2, oid, 1000, 2000), "halted")
    rejected(core, {"op": "halt", "symbol": SYM}, "already_halted")
    ok(core, cancel(2, oid))
    assert core.cash[2] == [1_000_000, 0]
    ok(core, {"op": "resume", "symbol": SYM})
    rejected(core, {"op": "resume", "symbol": SYM}, "not_halted")
    rejected(core, {"op": "halt", "symbol": "NOPE"}, "unknown_instrument")
    ok(core, buy(2, 1000, 1000))


def test_members_cannot_cancel_or_amend_other_accounts_orders(engine):
    core = make_core(engine)
    b = ok(core, buy(2, 1000, 1000)).order_id
    s = ok(core, sell(1, 1100, 1000)).order_id
    rejected(core, cancel(3, b), "not_found")
    rejected(core, amend(3, b, 1000, 1000), "not_found")
    rejected(core, cancel(2, s), "not_found")
    rejected(core, amend(2, s, 1100, 1000), "not_found")
    rejected(core, cancel(2, s + 100), "not_found")
    ok(core, cancel(2, b))
    rejected(core, cancel(2, b), "not_found")  # gone


@pytest.mark.parametrize("rules", [
    "not an object",
    {"colour": "red"},
    {"rules": {"frobnicate": 1}},
    {"rules": {"lot": 0}},
    {"rules": {"lot": 1.5}},
    {"rules": {"tick": -1}},
    {"rules": {"lot": 1000, "min_qty": 1500}},
    {"rules": {"band_bp": 10_000}},
    {"rules": {"max_price": 0}},
    {"rules": {"max_price": (1 << 26) + 1}},
    {"rules": {"reference_price": 0}},
    {"rules": {"max_price": 1000, "reference_price": 1001}},
    {"rules": {"sessions": [[600, 500]]}},
    {"rules": {"weekdays": [7]}},
    {"rules": {"always_open": 1}},
    {"maker_bp": 1001},
    {"taker_bp": -1},
    {"t1": "yes"},
])
def test_listing_with_bad_rules_is_rejected(engine, rules):
    core = make_core(engine)
    rejected(core, {"op": "list", "symbol": "NEW", "rules": rules}, "invalid_rules")


def test_listing_twice_or_with_bad_holdings_is_rejected(engine):
    core = make_core(engine)
    rejected(core, listing_cmd(), "instrument_exists")
    rejected(core, listing_cmd("NEW", holdings=((1, 0),)), "invalid_command")
    rejected(core, listing_cmd("NEW", holdings=((0, 1000),)), "invalid_command")
    rejected(core, {"op": "list", "symbol": "", "rules": {}}, "invalid_command")
    ok(core, listing_cmd("NEW", holdings=((3, 1000), (4, 2000))))
    assert (core.position("NEW", 3), core.position("NEW", 4)) == ((1000, 0, 0), (2000, 0, 0))


def test_malformed_commands_are_rejected(engine):
    core = make_core(engine)
    rejected(core, {"op": "nope"}, "invalid_command")
    rejected(core, buy(2, 1000, 1000), "invalid_command", T0 - 1)  # time goes backwards
    for cmd in (buy(True, 1000, 1000), buy(2, "1000", 1000), buy(2, 1000, 1000.0), buy(2, 1000, -1000),
                buy(2, 1000, 1000, coid=""), buy(2, 1000, 1000, post_only=1), deposit(2, 0, "x"),
                deposit(2, 10, ""), cancel(2, "1")):
        rejected(core, cmd, "invalid_command")
    rejected(core, buy(2, 1000, 1000, tif=9), "invalid_order")
    assert core.apply([], T0).code == "invalid_command"
    assert core.apply(buy(2, 1000, 1000), float(T0)).code == "invalid_command"


def test_rejected_commands_do_not_move_time(engine):
    core = make_core(engine)
    rejected(core, buy(3, 1000, 1000), "insufficient_funds", T0 + HOUR)
    ok(core, buy(2, 1000, 1000), T0 + MINUTE)  # earlier than the rejected command: fine
    assert core.ts == T0 + MINUTE


# ---- bugs found (fixed in the core; kept as tests) -----------------------------------------------------------------


def test_listing_with_a_repeated_holder_conserves_credits(engine):
    core = ExchangeCore(engine)
    out = core.apply(listing_cmd(holdings=((1, 5000), (1, 3000))), T0)
    held = sum(sum(core.position(SYM, a)) for a in core.credits.get(SYM, {}))
    assert out.code == "invalid_command" or held == 8000


def test_a_command_while_an_expiry_is_due_cannot_corrupt_the_core(engine):
    core = make_core(engine)
    ok(core, sell(1, 1100, 1000, tif=E.GTD, expire_ts=T0 + MINUTE))
    ok(core, sell(1, 1000, 1000))
    assert core.expiry_due(T0 + 2 * MINUTE)
    before = core.state_digest()
    out = core.apply(buy(2, 1000, 1000, post_only=True), T0 + 2 * MINUTE)
    assert E.EV_REJECTED not in [e[0] for e in out.events]
    assert core.check_invariants() == []
    assert out.accepted or core.state_digest() == before
    assert out.code == "expiry_due"  # found by this test; the core now refuses instead


def test_unhashable_op_or_symbol_is_rejected_not_raised(engine):
    core = make_core(engine)
    for cmd in ({"op": ["place"]}, {**buy(2, 1000, 1000), "symbol": [SYM]}, {"op": "halt", "symbol": {}}):
        assert core.apply(cmd, T0).code in ("invalid_command", "unknown_instrument")


# ---- random streams -------------------------------------------------------------------------------------

A, B = "CEA-T1", "CCER-T0"
SYMBOLS = (A, B)
LISTINGS = {
    # lot 1 t, price band 900..1100 around 1000, T+1, maker fee above the taker fee
    A: {"rules": {"always_open": True, "reference_price": 1000, "band_bp": 1000},
        "maker_bp": 25, "taker_bp": 10, "t1": True},
    # lot 100 kg (value rounding), tick 5, prices above 1100 refused by the book itself, no T+1
    B: {"rules": {"always_open": True, "lot": 100, "min_qty": 200, "tick": 5, "max_price": 1100},
        "maker_bp": 0, "taker_bp": 37, "t1": False},
}
LOT = {A: 1000, B: 100}
# Small holdings and purses, so that sellers soon need what they bought and buyers run short.
HOLDINGS = {A: [[1, 8_000], [2, 4_000], [3, 2_000]], B: [[1, 600], [2, 1_500], [3, 800], [4, 400]]}
OPENING_CASH = {1: 30_000, 2: 15_000, 3: 6_000, 4: 2_500}
ACCOUNTS = (1, 2, 3, 4)
START = local_ts(2024, 3, 4, 22, 0)  # Shanghai's next day starts 2 h later, UTC's 10 h later
NEXT_EXPIRY = -1
_SHANGHAI = ZoneInfo("Asia/Shanghai")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def shanghai_day(ts: int) -> int:
    """The calendar date in Shanghai of UTC-microsecond `ts` (computed apart from the core's arithmetic)."""
    return (_EPOCH + timedelta(microseconds=ts)).astimezone(_SHANGHAI).date().toordinal()


def opening() -> list[dict]:
    cmds = [{"op": "list", "symbol": s, "rules": LISTINGS[s], "holdings": HOLDINGS[s]} for s in SYMBOLS]
    return cmds + [deposit(a, OPENING_CASH[a], f"open-{a}") for a in ACCOUNTS]


OP_MIX = ("place",) * 16 + ("amend",) * 2 + ("pay",) * 2 + ("cancel", "resend", "halt", "expire", "freeze")


def random_step(seed: int) -> tuple[int, tuple]:
    """One step of a stream, from a seed: the time that passes before it, and the operation (made into
    a command by Stream.command, which may look at the core's open orders and at the model).

    Hypothesis draws one seed per step (cheap to generate and to shrink: it deletes steps and tries
    simpler seeds); a failing example's concrete commands are printed as a note."""
    r = random.Random(seed)
    dt_kind = r.randrange(20)
    if dt_kind < 10:
        dt = 0
    elif dt_kind < 15:
        dt = r.randint(1, 1000) * 100_000  # up to 100 s
    elif dt_kind < 18:
        dt = r.randint(1, 1000) * MINUTE // 4  # up to ~4 h
    elif dt_kind < 19:
        dt = r.randint(1, 1000) * HOUR // 40  # up to 25 h
    else:
        dt = NEXT_EXPIRY
    kind = r.choice(OP_MIX)
    if kind == "place":
        op: tuple = (
            "place", r.choice(ACCOUNTS), r.choice(SYMBOLS), r.choice((E.BID, E.ASK)),
            r.randrange(5),  # 4: market order
            r.randint(-80, 80),  # price - 1000 (buys a little higher, sells a little lower)
            r.randint(1, 6),  # lots
            r.choice((E.GTC, E.GTC, E.IOC, E.FOK, E.GTD)),
            r.randrange(5),  # 4: post-only
            r.randint(1, 3000),  # GTD life in minutes
            r.randrange(30),  # 9: one lot on CCER (below its minimum), 10: half a lot more, 11: off the tick,
            # 12..15: quantity or cash cap at the edge of what the account has
            r.randint(0, 6000),  # 6000 - market buy cash cap (a cap of 0 is invalid)
            r.randrange(80),  # client order id c0..c20, none above
        )
    elif kind == "cancel":
        op = ("cancel", r.randrange(1000), r.randrange(6))  # 5: as an account that does not own the order
    elif kind == "amend":
        op = ("amend", r.randrange(1000), r.randrange(6), r.randint(-80, 80), r.randint(1, 6), r.randrange(30))
    elif kind == "pay":
        op = ("pay", r.choice(("deposit", "withdraw")), r.choice(ACCOUNTS), r.randint(1, 20_000), r.randrange(40))
    elif kind == "resend":
        op = ("resend", r.randrange(1000))
    elif kind == "halt":
        op = ("halt", r.choice(SYMBOLS), r.randint(1, 8))  # resumed that many steps later
    elif kind == "freeze":  # a freeze's take (0: some, 1: all it can) or an unfreeze's give-back (2: some, 3: all)
        op = ("freeze", r.choice(ACCOUNTS), r.choice(SYMBOLS), r.randint(1, 6), r.randrange(4))
    else:
        op = ("expire",)
    return dt, op


steps = st.integers(0, 150).flatmap(lambda n: st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))


def _price(symbol: str, offset: int, wild: int) -> int:
    price = 1000 + offset
    return price - price % 5 + (wild == 11) if symbol == B else price


def _qty(symbol: str, lots: int, wild: int) -> int:
    if symbol == B:  # at least the minimum of 2 lots, unless wild
        lots = 1 if wild == 9 else lots + 1
    return lots * LOT[symbol] + (LOT[symbol] // 2 if wild == 10 else 0)


def _fee_bp(symbol: str) -> int:
    return max(LISTINGS[symbol]["maker_bp"], LISTINGS[symbol]["taker_bp"])


def _lots(symbol: str, kg: int) -> int:
    return max(0, kg - kg % LOT[symbol])


def _affordable(symbol: str, price: int, budget: int) -> int:
    """The largest quantity a limit buy at `price` can reserve within `budget` fen."""
    lot, fee_bp = LOT[symbol], _fee_bp(symbol)
    qty = _lots(symbol, budget * 1000 * 10_000 // (price * (10_000 + fee_bp)))
    while qty and buy_reservation(price, qty, lot, fee_bp) > budget:
        qty -= lot
    return qty


def terms(cmd: dict) -> tuple:
    """A place command's terms, as a resend must repeat them to be a resend (defaults filled in)."""
    tif = cmd.get("tif", E.GTC)
    return (cmd["symbol"], cmd["side"], cmd["kind"], cmd.get("price", 0), cmd["qty"], tif,
            cmd.get("post_only", False), cmd.get("cash_cap") or 0, cmd["expire_ts"] if tif == E.GTD else 0)


class Model:
    """What the accepted commands imply, rebuilt from their journal events alone: cash and credits of
    every account, fees, trade ids, what was bought on which Shanghai day, payment references, client
    order ids and GTD expiry times."""

    def __init__(self) -> None:
        self.net_payments = 0
        self.fees = 0
        self.cash: dict[int, int] = defaultdict(int)
        self.credits: dict[tuple[str, int], int] = defaultdict(int)
        self.bought: dict[tuple[str, int, int], int] = defaultdict(int)  # (symbol, account, day) -> kg
        self.trade_ids: dict[str, list[int]] = {s: [] for s in SYMBOLS}
        self.payments: dict[str, tuple[int, str, int]] = {}
        self.coids: dict[tuple[int, str], tuple] = {}  # -> (order_id, *terms)
        self.closed_at_roll: set[tuple[int, str]] = set()  # coids whose order had closed at the last roll
        self.forgotten = 0
        self.expiry: dict[int, int] = {}  # GTD order id -> expire_ts
        self.halted: set[str] = set()
        self.frozen: dict[tuple[str, int], int] = defaultdict(int)  # kg taken into freezes, not given back
        # (symbol, account, day) -> kg of that day's purchase a freeze took (older credits go first)
        # and not yet given back; a give-back out of a freeze that day relocks up to it.
        self.taken: dict[tuple[str, int, int], int] = defaultdict(int)

    def feed(self, cmd: dict, out: Outcome, ts: int, core: ExchangeCore) -> None:
        op = cmd["op"]
        if op in ("deposit", "withdraw"):
            self.payments[cmd["ref"]] = (cmd["account"], op, cmd["amount"])
        elif op == "place":
            if cmd.get("coid"):
                self.coids[cmd["account"], cmd["coid"]] = (out.order_id, *terms(cmd))
            if cmd.get("tif") == E.GTD and cmd["kind"] == E.LIMIT:
                self.expiry[out.order_id] = cmd["expire_ts"]
        elif op == "halt":
            self.halted.add(cmd["symbol"])
        elif op == "resume":
            self.halted.discard(cmd["symbol"])
        for e in out.events:
            if e[0] == EV_LISTED:
                for account, kg in HOLDINGS[e[1]]:
                    self.credits[e[1], account] += kg
            elif e[0] == EV_DEPOSIT:
                self.cash[e[1]] += e[2]
                self.net_payments += e[2]
            elif e[0] == EV_WITHDRAWAL:
                self.cash[e[1]] -= e[2]
                self.net_payments -= e[2]
            elif e[0] == EV_CREDITS_ADJUSTED:
                if cmd.get("frozen") and LISTINGS[e[1]]["t1"]:
                    self._freeze_takes_today(e[1], e[2], e[3], shanghai_day(ts), core)
                self.credits[e[1], e[2]] += e[3]
                if cmd.get("frozen"):
                    self.frozen[e[1], e[2]] -= e[3]
            elif e[0] == E.EV_TRADE:
                _, symbol, trade_id, _, _, buyer, seller, side, price, qty, value, bfee, sfee = e
                listing = LISTINGS[symbol]
                taker, maker = listing["taker_bp"], listing["maker_bp"]
                buyer_bp, seller_bp = (taker, maker) if side == E.BID else (maker, taker)
                assert value == trade_value_fen(price, qty)
                assert (bfee, sfee) == (fee_fen(value, buyer_bp), fee_fen(value, seller_bp))
                assert buyer != seller  # self-trade prevention
                self.trade_ids[symbol].append(trade_id)
                self.cash[buyer] -= value + bfee
                self.cash[seller] += value - sfee
                self.fees += bfee + sfee
                self.credits[symbol, buyer] += qty
                self.credits[symbol, seller] -= qty
                self.bought[symbol, buyer, shanghai_day(ts)] += qty

    def _freeze_takes_today(self, symbol: str, account: int, delta: int, day: int, core: ExchangeCore) -> None:
        """A take into a freeze uses older unencumbered credits first, then the day's purchase; a
        give-back out of one relocks what the day's takes had of it (called before `delta` is
        added to the holding; an adjust leaves open sells as they are)."""
        key = (symbol, account, day)
        if delta < 0:
            today = self.bought[key] - self.taken[key]
            older = self.credits[symbol, account] - core.position(symbol, account)[1] - today
            self.taken[key] += max(0, -delta - older)
        else:
            self.taken[key] -= min(delta, self.taken[key])

    def sellable(self, core: ExchangeCore, symbol: str, account: int, ts: int) -> int:
        """Credits that may be sold at `ts`: held, minus open sells, minus what is still held of
        that day's purchase (T+1)."""
        key = (symbol, account, shanghai_day(ts))
        today = self.bought[key] - self.taken[key] if LISTINGS[symbol]["t1"] else 0
        return self.credits[symbol, account] - core.position(symbol, account)[1] - today

    def free(self, core: ExchangeCore, account: int) -> int:
        """Cash not held for open buys (what is held is checked against the orders by the core)."""
        return self.cash[account] - core.cash.get(account, [0, 0])[1]

    def roll(self, open_orders: Iterable[int]) -> None:
        """A day's close forgets the client_order_ids whose orders had closed by the previous close
        (offset:KEY ones never)."""
        still = set(open_orders)
        closed = {k for k, v in self.coids.items() if v[0] not in still and not k[1].startswith("offset:")}
        for k in closed & self.closed_at_roll:
            del self.coids[k]
            self.forgotten += 1
        self.closed_at_roll = closed - self.closed_at_roll

    def due(self, core: ExchangeCore, ts: int) -> bool:
        return any(oid in core.orders for oid, at in self.expiry.items() if at <= ts)


def _taker_cost(core: ExchangeCore, symbol: str, account: int, limit: int, qty: int, ts: int) -> int:
    """What a buy at `limit` that never rests pays for what the book offers it at `ts`: the asks
    at or below the limit, best price first and oldest first (the book's own order, as it lists
    them), those due to expire left out, the buyer's own skipped (cancel-resting) or ending it."""
    asks = sorted((o for o in core.engine.book(symbol).orders() if o[2] == E.ASK
                   and not (o[5] == E.GTD and o[6] <= ts) and o[3] <= limit), key=lambda o: (o[3], o[9]))
    cancel_resting = core.engine.account_stp(account) == E.STP_CANCEL_RESTING
    cost, left = 0, qty
    for o in asks:
        if left == 0:
            break
        if o[1] == account:
            if cancel_resting:
                continue
            break
        value = trade_value_fen(o[3], min(left, o[4]))
        cost += value + fee_fen(value, LISTINGS[symbol]["taker_bp"])
        left -= min(left, o[4])
    return cost


def outcome(out: Outcome) -> tuple:
    return out.seq, out.code, out.events, out.order_id, out.duplicate


class Stream:
    """Turns generated steps into commands and applies each to every core in lockstep, checking the
    first core against the model and the specification after every command. `log` keeps the
    accepted commands with their times."""

    def __init__(self, cores: list[ExchangeCore]) -> None:
        self.cores = cores
        self.model = Model()
        self.ts = START
        self.log: list[tuple[dict, int, Outcome]] = []
        self.sent: list[dict] = []  # commands carrying a coid or a payment reference, for resends
        self.steps = 0
        self.rolls = 0
        self.resume_at: dict[str, int] = {}  # halted instruments resume at that step
        self.opened = False
        self.trace: list[tuple[int, dict, Outcome]] = []  # every command applied, for the report
        for cmd in opening():
            assert self.apply(cmd).seq is not None
        self.opened = True

    @property
    def core(self) -> ExchangeCore:
        return self.cores[0]

    def step(self, seed: int) -> None:
        core, model = self.core, self.model
        dt, op = random_step(seed)
        if dt == NEXT_EXPIRY:
            later = [at for oid, at in model.expiry.items() if oid in core.orders and at > self.ts]
            self.ts = min(later, default=self.ts + 1_000_000)
        else:
            self.ts += dt
        self.steps += 1
        cmd = self.command(op)
        due = model.due(core, self.ts)
        assert [c.expiry_due(self.ts) for c in self.cores] == [due] * len(self.cores)
        if due:  # the service's order: the due expiry first, as its own command; any other is refused
            if cmd is not EXPIRE:
                self.apply(cmd, ("code", "expiry_due"))
            out = self.apply(EXPIRE)
            assert out.seq is not None and of_kind(out, E.EV_EXPIRED)
        if core.roll_due(self.ts):  # then, as the service does, the last trading day's close
            assert self.apply(ROLL).seq is not None
            self.rolls += 1
        for symbol in SYMBOLS:
            if self.resume_at.get(symbol) == self.steps:
                del self.resume_at[symbol]
                assert self.apply({"op": "resume", "symbol": symbol}).seq is not None
        self.apply(cmd)
        assert not model.due(core, self.ts)  # no GTD order outlives its expiry

    def command(self, op: tuple) -> dict:
        core, model, ts = self.core, self.model, self.ts
        kind = op[0]
        if kind == "place":
            _, account, symbol, side, market_pick, offset, lots, tif, po, life, wild, cap, coid = op
            edge = 12 <= wild < 16
            cmd = {"op": "place", "account": account, "symbol": symbol, "side": side,
                   "qty": _qty(symbol, lots, wild)}
            if edge and side == E.ASK:  # all it may sell
                cmd["qty"] = _lots(symbol, model.sellable(core, symbol, account, ts)) or cmd["qty"]
            if market_pick == 4:
                cmd.update(kind=E.MARKET, tif=E.GTC if tif == E.GTC else E.IOC, post_only=po == 4 and wild == 9)
                if side == E.BID:  # a cap of all its free cash, give or take a few fen, or at random
                    cmd["cash_cap"] = max(1, model.free(core, account) - cap % 8) if edge else 6000 - cap
            else:
                offset += 30 if side == E.BID else -30
                cmd.update(kind=E.LIMIT, price=_price(symbol, offset, wild), tif=tif, post_only=po == 4)
                if tif == E.GTD:
                    cmd["expire_ts"] = ts + life * MINUTE
                if edge and side == E.BID:  # all it can afford, or one lot more
                    budget = model.free(core, account)
                    cmd["qty"] = _affordable(symbol, cmd["price"], budget) + LOT[symbol] * (lots % 2) or cmd["qty"]
            if coid <= 20:
                cmd["coid"] = f"c{coid}" if coid else "offset:k"  # the roll keeps offset:KEY ones
                self.sent.append(cmd)
            return cmd
        if kind in ("cancel", "amend"):
            open_ids = sorted(core.orders)
            if not open_ids:
                return cancel(1, op[1] + 1)
            oid = open_ids[op[1] % len(open_ids)]
            owner = core.orders[oid][O_ACCOUNT]
            account = owner if op[2] != 5 else owner % len(ACCOUNTS) + 1
            if kind == "cancel":
                return cancel(account, oid)
            o = core.orders[oid]
            symbol = o[O_SYMBOL]
            _, _, _, offset, lots, wild = op
            edge = 12 <= wild < 16
            price, qty = _price(symbol, offset, wild), _qty(symbol, lots, wild)
            if edge and o[O_SIDE] == E.ASK:  # up by all it may sell
                qty = o[O_REMAINING] + _lots(symbol, model.sellable(core, symbol, owner, ts))
            elif edge:  # all it can afford, or one lot more
                budget = model.free(core, owner) + o[O_RESERVED]
                qty = _affordable(symbol, price, budget) + LOT[symbol] * (lots % 2) or qty
            return amend(account, oid, price, qty)
        if kind == "pay":
            _, what, account, amount, ref = op
            if what == "withdraw" and amount > 14_000:  # all its free cash, give or take a fen
                amount = max(1, model.free(core, account) + amount % 3 - 1)
            cmd = {"op": what, "account": account, "amount": amount, "ref": f"r{ref}"}
            self.sent.append(cmd)
            return cmd
        if kind == "resend" and self.sent:
            return self.sent[op[1] % len(self.sent)]
        if kind == "halt":  # a halted instrument answers already_halted
            if op[1] not in self.resume_at:
                self.resume_at[op[1]] = self.steps + op[2]
            return {"op": "halt", "symbol": op[1]}
        if kind == "freeze":  # as the service sends them: a take only of what the core can spare
            _, account, symbol, lots, what = op
            if what < 2:
                available, _, locked = core.position(symbol, account)
                kg = -min(lots * LOT[symbol], available + locked) if what == 0 else -(available + locked)
            else:
                frozen = model.frozen[symbol, account]
                kg = frozen if what == 3 else min(lots * LOT[symbol], frozen)
            if kg:  # the take remembers what it took of the day's purchase (locked_takes)
                return {"op": "adjust", "credits": [[symbol, account, kg]], "frozen": True,
                        **({"take": True} if kg < 0 else {})}
        return EXPIRE

    def expect(self, cmd: dict) -> tuple:
        """What the specification says of `cmd` before it is applied: ("code", c) the code must be c
        (None: accepted); ("duplicate", order_id) only the earlier result; ("unless", c, ok) refused
        with c exactly when not ok (other rules may refuse it first); () nothing more."""
        core, model, ts, op = self.core, self.model, self.ts, cmd["op"]
        if op in ("deposit", "withdraw"):
            known = model.payments.get(cmd["ref"])
            if known is not None:
                same = known == (cmd["account"], op, cmd["amount"])
                return ("duplicate", None) if same else ("code", "duplicate_reference")
            enough = op == "deposit" or cmd["amount"] <= model.free(core, cmd["account"])
            return ("code", None if enough else "insufficient_funds")
        if op == "expire":
            return ("code", None if model.due(core, ts) else "invalid_command")
        if op == "roll":
            return ("code", None if core.roll_due(ts) else "invalid_command")
        if op == "adjust":
            return ("code", None)
        if op in ("halt", "resume"):
            return ("code", {"halt": "already_halted", "resume": "not_halted"}[op]
                    if (cmd["symbol"] in model.halted) == (op == "halt") else None)
        if op in ("cancel", "amend"):
            o = core.orders.get(cmd["order_id"])
            if o is None or o[O_ACCOUNT] != cmd["account"]:
                return ("code", "not_found")
            if op == "cancel":
                return ("code", None)  # also while halted
            symbol = o[O_SYMBOL]
            if o[O_SIDE] == E.BID:
                extra = buy_reservation(cmd["price"], cmd["qty"], LOT[symbol], _fee_bp(symbol)) - o[O_RESERVED]
                return ("unless", "insufficient_funds", extra <= model.free(core, cmd["account"]))
            extra = cmd["qty"] - o[O_REMAINING]
            return ("unless", "insufficient_credits", extra <= model.sellable(core, symbol, cmd["account"], ts))
        account, symbol, qty = cmd["account"], cmd["symbol"], cmd["qty"]
        known = model.coids.get((account, cmd.get("coid")))
        if known is not None:
            if known[1:] == terms(cmd):
                return ("duplicate", known[0])
            return ("code", "duplicate_client_order_id")
        if cmd["side"] == E.ASK:
            return ("unless", "insufficient_credits", qty <= model.sellable(core, symbol, account, ts))
        if cmd["kind"] == E.MARKET:
            need = market_buy_reservation(cmd["cash_cap"], qty, LOT[symbol], _fee_bp(symbol))
        else:
            need = buy_reservation(cmd["price"], qty, LOT[symbol], _fee_bp(symbol))
            if cmd.get("tif") in (E.IOC, E.FOK):  # never rests: what it can meet now, exactly
                need = min(need, _taker_cost(core, symbol, account, cmd["price"], qty, ts) or need)
        return ("unless", "insufficient_funds", need <= model.free(core, account))

    def apply(self, cmd: dict, expect: tuple | None = None) -> Outcome:
        core, ts = self.core, self.ts
        before = core.state_digest()
        if expect is None:
            expect = self.expect(cmd) if self.opened else ()
        outs = [c.apply(cmd, ts) for c in self.cores]
        out = outs[0]
        self.trace.append((ts, cmd, out))
        for other in outs[1:]:
            assert outcome(other) == outcome(out), cmd
        digest = core.state_digest()
        for c in self.cores[1:]:
            assert c.state_digest() == digest, cmd
        if out.seq is None:  # rejected, or a duplicate that only returns the earlier result
            assert out.events == [] and digest == before, (cmd, out)
            assert (out.code is None) == out.duplicate
        else:
            assert out.code is None and not out.duplicate and out.seq == len(self.log) + 1 == core.seq
            assert core.ts == ts
            kinds = {e[0] for e in out.events}
            assert E.EV_REJECTED not in kinds, (cmd, out.events)
            assert (E.EV_EXPIRED in kinds) == (cmd["op"] == "expire"), (cmd, out.events)  # only through expire
            self.log.append((cmd, ts, out))
            self.model.feed(cmd, out, ts, core)
            if cmd["op"] == "roll":
                self.model.roll(core.orders.keys())
            self._check_rests(cmd, out)
        if expect:
            if expect[0] == "code":
                assert out.code == expect[1] and not out.duplicate, (cmd, expect, out.code, out.detail)
            elif expect[0] == "duplicate":
                assert out.duplicate and out.order_id == expect[1], (cmd, expect, out)
            else:
                code, enough = expect[1:]
                assert out.code != code or not enough, (cmd, out.detail)
                assert out.seq is None or enough, cmd
        self.check()
        return out

    def _check_rests(self, cmd: dict, out: Outcome) -> None:
        """A limit buy that rests untouched holds exactly buy_reservation(limit, qty, lot, max fee)."""
        if cmd["op"] == "place" and cmd["side"] == E.BID and cmd["kind"] == E.LIMIT and not trades(out):
            o = self.core.orders.get(out.order_id)
            if o is not None:
                symbol = cmd["symbol"]
                assert o[O_RESERVED] == buy_reservation(cmd["price"], cmd["qty"], LOT[symbol], _fee_bp(symbol))

    def check(self) -> None:
        core, model = self.core, self.model
        assert core.check_invariants() == []
        for account in ACCOUNTS:
            balance, held = core.cash.get(account, [0, 0])
            assert balance == model.cash[account] and 0 <= held <= balance
        for symbol in SYMBOLS:
            for account in ACCOUNTS:
                available, encumbered, locked = core.position(symbol, account)
                assert min(available, encumbered, locked) >= 0
                assert available + encumbered + locked == model.credits[symbol, account]
                if not LISTINGS[symbol]["t1"]:
                    assert locked == 0
                # T+1 exactly, freezes and unfreezes included: sellable now is what is held, less
                # open sells, less what was bought today (the core never frees more, nor less)
                assert core.position(symbol, account, self.ts)[0] == max(0, model.sellable(core, symbol, account,
                                                                                           self.ts))
                held = core.frozen_locked.get((symbol, account))
                assert held is None or 0 < held[1] <= model.frozen[symbol, account]

    def describe(self) -> str:
        def result(out: Outcome) -> object:
            return out.code or ("duplicate" if out.duplicate else out.seq)

        return "\n".join(f"{(ts - START) / 1e6:>10.1f} s  {cmd}  ->  {result(out)}" for ts, cmd, out in self.trace)

    def finish(self) -> None:
        core, model = self.core, self.model
        assert sum(balance for balance, _ in core.cash.values()) + model.fees == model.net_payments
        for symbol in SYMBOLS:
            assert sum(sum(core.position(symbol, a)) for a in core.credits[symbol]) + sum(
                model.frozen[symbol, a] for a in ACCOUNTS) == sum(kg for _, kg in HOLDINGS[symbol])
            ids = model.trade_ids[symbol]
            assert ids == list(range(1, len(ids) + 1)) and core.trade_ids[symbol] == len(ids)


def replay(log: list[tuple[dict, int, Outcome]], engine: str) -> ExchangeCore:
    fresh = ExchangeCore(engine)
    for cmd, ts, out in log:
        assert outcome(fresh.apply(cmd, ts)) == outcome(out), cmd
    return fresh


@contextmanager
def reported(stream: Stream) -> Iterator[None]:
    """On failure, show the commands the stream applied (hypothesis prints notes of the final example)."""
    try:
        yield
    except BaseException:
        note("commands (time from the start, command, code or sequence number):\n" + stream.describe())
        raise


SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=200, **SETTINGS)
@given(seeds=steps, split=st.integers(0, 150))
def test_random_streams_keep_the_core_consistent_replayable_and_restorable(seeds, split):
    stream = Stream([ExchangeCore("cython")])
    with reported(stream):
        for seed in seeds[:split]:
            stream.step(seed)

        # a snapshot restores to the same state (on either engine), then runs on in lockstep
        core = stream.core
        snap = core.snapshot()
        restored = ExchangeCore.restore(snap, "cython")
        assert restored.state_digest() == core.state_digest() and restored.check_invariants() == []
        assert ExchangeCore.restore(snap, "reference").state_digest() == core.state_digest()
        for at in sorted(stream.model.expiry.values()):
            assert restored.expiry_due(at) == core.expiry_due(at)
        stream.cores.append(restored)
        for seed in seeds[split:]:
            stream.step(seed)

        stream.finish()
        assert replay(stream.log, "cython").state_digest() == core.state_digest()
        assert ExchangeCore.restore(core.snapshot(), "cython").state_digest() == core.state_digest()


@settings(max_examples=120, **SETTINGS)
@given(seeds=steps)
def test_cython_and_reference_cores_agree(seeds):
    stream = Stream([ExchangeCore("cython"), ExchangeCore("reference")])
    with reported(stream):
        for seed in seeds:
            stream.step(seed)
        stream.finish()


def test_streams_close_days_and_forget_client_order_ids():
    """The streams above cross trading days; with these seeds they close days and forget client
    order ids, and a resend of a forgotten one places a new order, all checked against the model."""
    stream = Stream([ExchangeCore("cython"), ExchangeCore("reference")])
    with reported(stream):
        for seed in range(2_000):
            stream.step(seed)
        stream.finish()
    assert stream.rolls >= 3 and stream.model.forgotten >= 3, (stream.rolls, stream.model.forgotten)
    assert replay(stream.log, "cython").state_digest() == stream.core.state_digest()


def test_booleans_are_not_sides_or_times_in_force(engine):
    core = make_core(engine)
    before = core.state_digest()
    for field in ("side", "tif", "kind"):
        out = core.apply({**buy(2, 1000, 1000), field: True}, T0)
        assert out.code == "invalid_order", (field, out)
    assert core.state_digest() == before
