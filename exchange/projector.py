"""Applies the journal to the registry and the cash ledger, in sequence, exactly once.

The journal is the system of record; the registry's blocks and the ledger's balances follow it.
:func:`project` takes the journal entries after the consumer's stored position, turns them into
a plan (clearing/settlement.py: payments, delivery-versus-payment trades, encumbrances), and
applies the plan and the new position in one transaction. A crash anywhere loses either the whole
batch or nothing, and the next run starts from the stored position, so every entry — every trade
in particular — is applied exactly once. The primary key of ``settled_trades`` and the unique
``(kind, ref)`` of ledger entries make a second settlement of a trade impossible even for a buggy
caller.

A batch is written with few statements: one for every ledger entry, posting and settled_trades
row of its trades (plus two for its payments, if any), and the registry movements as one
`registry.StepBatch` (one read of the blocks concerned, one DELETE, one COPY of blocks, one COPY
of transfer rows), planned in Python while the server writes the cash. The registry movements
are netted per batch (clearing.settlement.netted): each account's encumbrances and releases of
a symbol become one net encumbrance before the trades or one net release after them; each trade
keeps its own transfer row ``trade:SYMBOL:ID``. Which serials a trade delivers can therefore
differ from journal order (the quantities never do). When the netted order finds too few
credits (credits bought and resold in one batch), the batch is planned again in journal order
on the same locks; nothing has been written by then, so no savepoint is needed.

`catch_up` reads ahead: inside each batch's transaction it also reads the next batch's journal
rows, and decodes and plans them while the server writes the current batch's cash (the Python
work and the server's work overlap instead of taking turns). The next transaction uses them only
if the stored position it locks is the one they were read after and their sequence numbers
follow it without a gap; otherwise it reads again. Journal rows never change once written, so a
row read one transaction early is the row the next transaction would read.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import orjson

from clearing.settlement import MalformedEntry, Move, Plan, netted, plan, postings
from exchange import registry
from exchange.accounts import SYSTEM_CUSTODY, SYSTEM_FEES
from exchange.journal import lock_position, read, save_position

NAME = "projector"
BATCH = 5_000


async def position(conn: asyncpg.Connection, name: str = NAME) -> int:
    """How far the consumer `name` has applied the journal (0 before its first run)."""
    return await conn.fetchval("SELECT coalesce((SELECT seq FROM journal_consumers WHERE name = $1), 0)", name)


@dataclass(frozen=True, slots=True)
class _Ahead:
    """Journal entries read and planned during the previous batch's transaction."""

    after: int  # the position they were read after
    entries: int
    work: Plan


async def project(conn: asyncpg.Connection, limit: int = BATCH, upto: int | None = None, net: bool = True) -> int:
    """Apply up to `limit` journal entries past the stored position; returns how many. With `net`
    False the registry movements are applied in journal order (the reference for netting)."""
    return (await _project(conn, limit, upto, net, None, False))[0]


async def catch_up(conn: asyncpg.Connection, upto: int | None = None, limit: int = BATCH, net: bool = True) -> int:
    """Project until the journal (or `upto`) is fully applied; returns the entries applied. Each
    batch reads the next one ahead (see the module docstring); an empty read ahead ends it."""
    done = 0
    ahead: _Ahead | None = None
    while True:
        n, ahead, more = await _project(conn, limit, upto, net, ahead, True)
        done += n
        if not n or not more:
            return done


async def _project(conn: asyncpg.Connection, limit: int, upto: int | None, net: bool, ahead: _Ahead | None,
                   read_ahead: bool) -> tuple[int, _Ahead | None, bool]:
    """One batch: (entries applied, the next batch read and planned ahead or None, whether the
    read ahead found entries)."""
    async with conn.transaction():
        start = await lock_position(conn, NAME)
        if ahead is not None and ahead.after == start:
            n, work = ahead.entries, ahead.work
        else:
            rows = await read(conn, start, limit, upto)
            if not rows:
                return 0, None, False
            n, work = len(rows), plan((r["seq"], r["ts"], orjson.loads(r["events"])) for r in rows)
        following = await read(conn, work.last_seq, limit, upto) if read_ahead else []
        planned: list[_Ahead] = []

        def plan_following() -> None:
            # Only a gapless run of entries is kept: the next transaction then reads exactly these.
            if following and following[-1]["seq"] - work.last_seq == len(following):
                with contextlib.suppress(MalformedEntry):  # refused in its own batch, which reads it again
                    planned.append(_Ahead(work.last_seq, len(following), plan(
                        (r["seq"], r["ts"], orjson.loads(r["events"])) for r in following)))

        await _apply(conn, work, net, plan_following)
        await save_position(conn, NAME, work.last_seq)
        return n, (planned[0] if planned else None), bool(following)


# The system accounts' ids, looked up once per connection (so per database) rather than per batch:
# the migrations create them, and accounts_referenced refuses to renumber or delete an account
# once ledger rows name it.
_SYSTEM_IDS: weakref.WeakKeyDictionary[asyncpg.Connection, tuple[int, int]] = weakref.WeakKeyDictionary()


async def _system_ids(conn: asyncpg.Connection) -> tuple[int, int]:
    known = _SYSTEM_IDS.get(conn)
    if known is None:
        rows = await conn.fetch("SELECT code, id FROM accounts WHERE code = ANY($1::text[])",
                                [SYSTEM_CUSTODY, SYSTEM_FEES])
        ids = {r["code"]: r["id"] for r in rows}
        known = _SYSTEM_IDS[conn] = (ids[SYSTEM_CUSTODY], ids[SYSTEM_FEES])
    return known


# One statement for the batch's cash and settled trades: the trades' ledger entries, every
# posting of the batch (trades' and payments'), and the settled_trades rows. One statement keeps
# the ledger's rule "balances are checked per statement" exactly as before (the core keeps every
# balance non-negative at the end of the batch, not necessarily after each part of it). Each
# trade's entry id is drawn from the entries' own sequence before the rows are written, so its
# postings name it directly (before, the entries' RETURNING rows were joined back by reference,
# a sort of both sides per batch).
_CASH = """
WITH t AS MATERIALIZED (
    SELECT nextval('ledger_entries_id_seq') AS entry, *
      FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                  $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[])
           AS t(symbol, trade_id, seq, ts, buyer, seller, price, qty, value, bfee, sfee)),
e AS (
    INSERT INTO ledger_entries (id, kind, ref) OVERRIDING SYSTEM VALUE
    SELECT entry, 'trade', 'trade:' || symbol || ':' || trade_id FROM t),
s AS (
    INSERT INTO settled_trades (symbol, trade_id, seq, ts, buyer_id, seller_id, price_fen, qty_kg, value_fen,
                                buyer_fee_fen, seller_fee_fen)
    SELECT symbol, trade_id, seq, ts, buyer, seller, price, qty, value, bfee, sfee FROM t)
INSERT INTO postings (entry_id, account_id, amount_fen)
SELECT t.entry, x.account, x.amount
  FROM t CROSS JOIN LATERAL (VALUES (t.buyer, -(t.value + t.bfee)), (t.seller, t.value - t.sfee),
                                    ($12::bigint, t.bfee + t.sfee)) AS x(account, amount)
 WHERE x.amount <> 0
UNION ALL
SELECT * FROM unnest($13::bigint[], $14::bigint[], $15::bigint[])
"""


async def _apply(conn: asyncpg.Connection, work: Plan, net: bool = True,
                 meanwhile: Callable[[], None] | None = None) -> None:
    """Write `work`: cash and settled trades in one statement, the registry movements as one
    `StepBatch`, netted (see clearing.settlement.netted) unless `net` is False or the netted
    order finds too few credits, in which case journal order is applied instead. `meanwhile`
    (Python only, no database) runs while the server writes the cash."""
    steps: registry.StepBatch | None = None
    if work.moves:
        issuances = {s: tuple(await registry.resolve_issuances(conn, symbol=s)) for s in work.symbols}
        # Lock every holder and account journal order touches, whichever order is planned (netting
        # only combines movements of one holder), so that falling back changes no lock and needs
        # no savepoint: nothing is written before a plan has succeeded. The steps themselves are
        # built later, while the server writes the cash.
        steps = registry.StepBatch((), [(m.from_account, m.from_state, iss) for m in work.moves
                                        for iss in issuances[m.symbol]], {m.to_account for m in work.moves})
        await steps.lock(conn)
    cash = None
    if work.payments or work.trades:
        cash = asyncio.ensure_future(_apply_cash(conn, work, *await _system_ids(conn)))
        await asyncio.sleep(0)  # let it send its statements; plan the registry while the server works
    try:
        if steps is not None:
            try:
                steps.plan([_step(m, issuances) for m in (netted(work.moves) if net else work.moves)])
            except registry.StepsFailed:
                if not net:
                    raise
                # e.g. credits bought and resold within the batch (T+1 off)
                steps.replan([_step(m, issuances) for m in work.moves])
        if meanwhile is not None:
            meanwhile()
    finally:
        if cash is not None:
            await cash  # also when planning failed: the connection must be idle before the rollback
    if steps is not None:
        await steps.write(conn)


async def _apply_cash(conn: asyncpg.Connection, work: Plan, custody: int, fees: int) -> None:
    pay_entries: list[int] = []
    pay_accounts: list[int] = []
    pay_amounts: list[int] = []
    if work.payments:
        p = work.payments
        rows = await conn.fetch(
            "INSERT INTO ledger_entries (kind, ref) SELECT * FROM unnest($1::text[], $2::text[]) "
            "RETURNING id, kind, ref", [x.direction for x in p], [x.reference for x in p])
        entry_id = {(r["kind"], r["ref"]): r["id"] for r in rows}
        await conn.execute(
            "INSERT INTO payments (account_id, direction, amount_fen, reference, entry_id) "
            "SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])",
            [x.account for x in p], [x.direction for x in p], [x.amount for x in p], [x.reference for x in p],
            [entry_id[(x.direction, x.reference)] for x in p])
        for kind, ref, account, amount in postings(Plan(payments=p), custody, fees):
            pay_entries.append(entry_id[(kind, ref)])
            pay_accounts.append(account)
            pay_amounts.append(amount)
    # Trades are named tuples: one transposition gives every column (fields in Trade's order).
    seq, ts, symbol, trade_id, buyer, seller, price, qty, value, bfee, sfee = (
        zip(*work.trades, strict=True) if work.trades else ((),) * 11)
    await conn.execute(_CASH, symbol, trade_id, seq, ts, buyer, seller, price, qty, value, bfee, sfee, fees,
                       pay_entries, pay_accounts, pay_amounts)


def _step(m: Move, issuances: dict[str, tuple[int, ...]]) -> registry.Step:
    return registry.Step(issuances[m.symbol], m.from_account, m.from_state, m.to_account, m.to_state, m.qty, m.cause,
                         m.reference)
