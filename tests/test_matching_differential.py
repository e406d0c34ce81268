"""Differential tests: the Cython book must emit exactly the reference book's events.

Both books get the same command streams (hypothesis-generated and long seeded random ones); after
every command the events must be equal, and both books must satisfy the book invariants: never
crossed, FIFO by arrival within each level, level totals equal to the sum of their orders, and
per-order conservation (submitted = filled + cancelled/expired + resting).
"""

from __future__ import annotations

import random
from array import array
from collections import defaultdict

import pytest
from cext.book import OPS, CythonBook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matching import events as E
from matching.book import make_book
from matching.reference import BATCH_STRIDE, ReferenceBook

# ---- command model used by these tests ----------------------------------------------------------


def apply(book, cmd: tuple) -> None:
    op = cmd[0]
    if op == "submit":
        book.submit(*cmd[1])
    elif op == "cancel":
        book.cancel(*cmd[1:])
    elif op == "move":
        book.move(*cmd[1:])
    elif op == "reduce":
        book.reduce(*cmd[1:])
    elif op == "amend":
        book.amend(*cmd[1:])
    elif op == "expire":
        book.expire(*cmd[1:])
    else:
        raise AssertionError(op)


class Ledger:
    """Per-order quantity accounting rebuilt from events alone."""

    def __init__(self) -> None:
        self.submitted: dict[int, int] = defaultdict(int)
        self.filled: dict[int, int] = defaultdict(int)
        self.gone: dict[int, int] = defaultdict(int)  # cancelled or expired remainders
        self.open: dict[int, int] = defaultdict(int)

    def feed(self, evs: list[tuple[int, ...]]) -> None:
        for e in evs:
            if e[0] == E.EV_ACCEPTED:
                self.submitted[e[1]] += e[5]
                self.open[e[1]] = e[5]
            elif e[0] == E.EV_TRADE:
                for oid in (e[1], e[2]):
                    self.filled[oid] += e[7]
                    self.open[oid] -= e[7]
            elif e[0] in (E.EV_CANCELLED, E.EV_EXPIRED):
                self.gone[e[1]] += e[2]
                self.open[e[1]] -= e[2]
            elif e[0] == E.EV_AMENDED:
                self.submitted[e[1]] += e[3] - self.open[e[1]]
                self.open[e[1]] = e[3]

    def check(self, book) -> None:
        for oid, sub in self.submitted.items():
            resting = book.order_qty(oid)
            assert sub == self.filled[oid] + self.gone[oid] + resting, oid
            assert self.open[oid] == resting, oid


def check_book(book) -> None:
    bid, ask = book.best_bid(), book.best_ask()
    assert bid is None or ask is None or bid < ask, "crossed"
    orders = book.orders()
    assert len(orders) == len(book)
    levels: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for o in orders:
        levels[(o[2], o[3])].append(o)
    for (side, _price), queue in levels.items():
        seqs = [o[9] for o in queue]
        assert seqs == sorted(seqs), "level not FIFO"
        assert all(o[4] > 0 for o in queue)
        assert side in (E.BID, E.ASK)
    for side in (E.BID, E.ASK):
        depth = book.depth(side, 10**9)
        assert depth == [(p, sum(o[4] for o in levels[(side, p)])) for p, _ in depth]
        assert len(depth) == len([k for k in levels if k[0] == side])
        prices = [p for p, _ in depth]
        assert prices == sorted(prices, reverse=side == E.BID)


def run_both(cmds: list[tuple], every: int = 1, **options) -> tuple[list, list]:
    ref, cy = ReferenceBook(**options), CythonBook(**options)
    ledger = Ledger()
    all_ref, all_cy = [], []
    for k, cmd in enumerate(cmds):
        apply(ref, cmd)
        apply(cy, cmd)
        er, ec = ref.events(), cy.events()
        assert er == ec, (k, cmd, er, ec)
        ledger.feed(er)
        all_ref.extend(er)
        all_cy.extend(ec)
        if k % every == 0 or k == len(cmds) - 1:
            check_book(ref)
            check_book(cy)
            cy.check_invariants()
            ledger.check(ref)
            assert ref.orders() == cy.orders()
    assert ref.state_digest() == cy.state_digest()
    return all_ref, all_cy


# ---- seeded random streams ---------------------------------------------------------------------


def random_stream(seed: int, n: int, *, price_lo: int = 95, price_hi: int = 105, qty_hi: int = 9,
                  qty_unit: int = 1, accounts: int = 4, cash_hi: int = 3000) -> list[tuple]:
    """A mixed stream that exercises every command and flag, mostly on live ids."""
    r = random.Random(seed)
    live: list[int] = []
    next_id = 1
    ts = 0
    cmds: list[tuple] = []
    for _ in range(n):
        ts += r.choice((0, 0, 1, 2, 5))
        x = r.random()
        if x < 0.45 or not live:
            if live and r.random() < 0.02:
                oid = r.choice(live)  # a duplicate id
            else:
                oid = next_id
                next_id += 1
            kind = E.MARKET if r.random() < 0.05 else E.LIMIT
            price = r.randint(price_lo, price_hi)
            qty = r.randint(1, qty_hi) * qty_unit
            if r.random() < 0.02:
                price, qty = r.choice(((0, qty), (-3, qty), (price, 0), (price, -1), (1 << 23, qty)))
            args = (oid, r.randint(1, accounts), r.randint(0, 1), price, qty,
                    r.choice((E.GTC, E.GTC, E.GTC, E.IOC, E.FOK, E.GTD)), ts, kind,
                    r.random() < 0.1, ts + r.randint(-1, 30), r.choice((0, 0, 1, 2, 3)),
                    r.randint(0, cash_hi))
            cmds.append(("submit", args))
            live.append(oid)
            continue
        oid = r.choice(live) if r.random() < 0.9 else next_id + 1000
        if x < 0.58:
            cmds.append(("cancel", oid, ts))
        elif x < 0.75:
            cmds.append(("move", oid, r.randint(price_lo - 1, price_hi + 1), ts))
        elif x < 0.85:
            cmds.append(("reduce", oid, r.randint(-1, qty_hi) * qty_unit, ts))
        elif x < 0.97:
            cmds.append(("amend", oid, r.randint(price_lo - 1, price_hi + 1),
                         r.randint(0, qty_hi) * qty_unit, ts))
        else:
            ts += 10
            cmds.append(("expire", ts))
        if len(live) > 300:
            live = live[-200:]
    return cmds


@pytest.mark.parametrize("seed", range(12))
def test_random_streams_agree(seed: int) -> None:
    all_ref, _ = run_both(random_stream(seed, 4000), every=7)
    kinds = {e[0] for e in all_ref}
    assert {E.EV_TRADE, E.EV_CANCELLED, E.EV_AMENDED, E.EV_EXPIRED, E.EV_REJECTED} <= kinds


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_agree_with_reduce_losing_priority(seed: int) -> None:
    run_both(random_stream(100 + seed, 3000), every=5, reduce_loses_priority=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_in_fen_and_kg_with_cash_caps(seed: int) -> None:
    # Engine units: prices in fen per tonne, quantities in kg in lots of 1000, caps that bind.
    all_ref, _ = run_both(
        random_stream(200 + seed, 3000, price_lo=4900, price_hi=5100, qty_unit=1000,
                      cash_hi=60_000),
        every=5, lot=1000,
    )
    reasons = {e[3] for e in all_ref if e[0] == E.EV_CANCELLED}
    assert E.CANCEL_CASH_CAP in reasons


def test_wide_sparse_prices_agree() -> None:
    # Prices spread far apart exercise the bitmap scans across many words and ladder growth.
    run_both(random_stream(300, 4000, price_lo=1, price_hi=200_000, accounts=50), every=11)


def test_long_stream_digest_agrees() -> None:
    ref, cy = ReferenceBook(), CythonBook()
    for cmd in random_stream(400, 100_000, accounts=20):
        apply(ref, cmd)
        apply(cy, cmd)
    assert E.encode(ref.events()) == E.encode(cy.events())
    assert ref.state_digest() == cy.state_digest()
    cy.check_invariants()


# ---- hypothesis --------------------------------------------------------------------------------

ids = st.integers(1, 12)
prices = st.integers(0, 8)
qtys = st.integers(-1, 6)
submit = st.tuples(
    st.just("submit"),
    st.tuples(ids, st.integers(1, 3), st.sampled_from((0, 1, 0, 1, 0, 1, 2, -1)), prices, qtys,
              st.sampled_from((E.GTC, E.IOC, E.FOK, E.GTD, E.GTC, E.IOC, E.FOK, E.GTD, 4)),
              st.just(0), st.sampled_from((E.LIMIT, E.LIMIT, E.LIMIT, E.MARKET, 2)),
              st.booleans(), st.integers(0, 4), st.integers(0, 4), st.integers(0, 3)),
)
command = st.one_of(
    submit,
    submit,
    st.tuples(st.just("cancel"), ids),
    st.tuples(st.just("move"), ids, prices),
    st.tuples(st.just("reduce"), ids, qtys),
    st.tuples(st.just("amend"), ids, prices, qtys),
    st.tuples(st.just("expire"), st.integers(0, 4)),
)


def with_time(cmds: list[tuple]) -> list[tuple]:
    """Give commands non-decreasing timestamps (the submit tuple carries ts at index 6)."""
    out = []
    ts = 0
    for cmd in cmds:
        ts += 1
        if cmd[0] == "submit":
            a = list(cmd[1])
            a[6] = ts
            a[9] = ts + a[9] - 1  # expire_ts may equal ts (rejected) or lie a little ahead
            out.append(("submit", tuple(a)))
        elif cmd[0] == "expire":
            ts += cmd[1]
            out.append(("expire", ts))
        else:
            out.append((*cmd, ts))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(command, max_size=80), st.booleans())
def test_hypothesis_streams_agree(cmds: list[tuple], reduce_loses: bool) -> None:
    run_both(with_time(cmds), reduce_loses_priority=reduce_loses)


# Engine units: fen prices near 50 CNY, kg in 1000 kg lots, market buys with binding cash caps.
fen_submit = st.tuples(
    st.just("submit"),
    st.tuples(ids, st.integers(1, 3), st.integers(0, 1), st.integers(4990, 5010),
              st.integers(1, 5).map(lambda q: q * 1000), st.sampled_from((E.GTC, E.IOC)),
              st.just(0), st.sampled_from((E.LIMIT, E.LIMIT, E.MARKET)), st.just(False),
              st.just(0), st.integers(0, 3), st.integers(1, 40_000)),
)
fen_command = st.one_of(
    fen_submit, fen_submit, fen_submit,
    st.tuples(st.just("cancel"), ids),
    st.tuples(st.just("amend"), ids, st.integers(4990, 5010),
              st.integers(1, 5).map(lambda q: q * 1000)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fen_command, max_size=60))
def test_hypothesis_cash_capped_market_buys_agree(cmds: list[tuple]) -> None:
    all_ref, _ = run_both(with_time(cmds), lot=1000)
    for e in all_ref:
        if e[0] == E.EV_TRADE:
            assert e[7] % 1000 == 0, "a cash cap must still trade whole lots"


# ---- batch entry point, snapshots, determinism -------------------------------------------------


def to_batch(cmds: list[tuple]) -> array:
    """Lay commands out in the run_batch buffer format."""
    buf = array("q")
    for cmd in cmds:
        op = cmd[0]
        if op == "submit":
            oid, acct, side, price, qty, tif, ts, kind, post, exp, stp, cash = cmd[1]
            flags = side | tif << 2 | kind << 4 | int(post) << 6 | stp << 8
            extra = exp if kind == E.LIMIT and tif == E.GTD else cash
            buf.extend((E.OP_SUBMIT, oid, acct, flags, price, qty, ts, extra))
        elif op == "cancel":
            buf.extend((E.OP_CANCEL, cmd[1], 0, 0, 0, 0, cmd[2], 0))
        elif op == "move":
            buf.extend((E.OP_MOVE, cmd[1], 0, 0, cmd[2], 0, cmd[3], 0))
        elif op == "reduce":
            buf.extend((E.OP_REDUCE, cmd[1], 0, 0, 0, cmd[2], cmd[3], 0))
        elif op == "amend":
            buf.extend((E.OP_AMEND, cmd[1], 0, 0, cmd[2], cmd[3], cmd[4], 0))
        else:
            buf.extend((E.OP_EXPIRE, 0, 0, 0, 0, 0, cmd[1], 0))
    return buf


@pytest.mark.parametrize("workload", ["exchange-core", "simple"])
def test_generated_workloads_full_events_agree(workload: str) -> None:
    from matching.workloads import generate_batch

    buf = generate_batch(workload, 60_000, seed=11)
    ref, cy = ReferenceBook(), CythonBook()
    ref.run_batch(buf)
    cy.run_batch(buf)
    assert E.digest(ref.events()) == E.digest(cy.events())
    assert ref.state_digest() == cy.state_digest()
    cy.check_invariants()


def test_op_codes_agree() -> None:
    assert {k: getattr(E, "OP_" + k.upper()) for k in OPS} == OPS
    assert BATCH_STRIDE == 8


@pytest.mark.parametrize("seed", range(3))
def test_batch_equals_per_command(seed: int) -> None:
    cmds = random_stream(500 + seed, 5000)
    ref = ReferenceBook()
    for cmd in cmds:
        apply(ref, cmd)
    expected = ref.events()
    cy = CythonBook()
    buf = to_batch(cmds)
    n = cy.run_batch(buf)
    got = cy.events()
    assert n == len(got)
    assert got == expected
    ref2 = ReferenceBook()
    ref2.run_batch(buf)
    assert ref2.events() == expected
    cy2 = CythonBook()
    cy2.run_batch(buf)
    trades = cy2.take_trades()
    assert list(trades) == [x for e in expected if e[0] == E.EV_TRADE
                            for x in (e[1], e[2], e[6], e[7])]
    assert cy2.pending_events == 0


@pytest.mark.parametrize("engine", ["reference", "cython"])
def test_snapshot_restore_continues_identically(engine: str) -> None:
    cmds = random_stream(600, 3000)
    first, rest = cmds[:1500], cmds[1500:]
    book = make_book(engine)
    for cmd in first:
        apply(book, cmd)
    book.clear_events()
    snap = book.snapshot()
    twin = make_book("cython" if engine == "reference" else "reference")
    twin.restore(snap)
    assert twin.state_digest() == book.state_digest()
    assert twin.events() == []
    for cmd in rest:
        apply(book, cmd)
        apply(twin, cmd)
        assert book.events() == twin.events()
    assert twin.state_digest() == book.state_digest()


def test_same_stream_same_bytes() -> None:
    cmds = random_stream(700, 3000)
    outs = []
    for engine in ("cython", "cython", "reference"):
        book = make_book(engine)
        for cmd in cmds:
            apply(book, cmd)
        outs.append(E.encode(book.events()))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) > 10_000
