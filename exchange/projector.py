"""Applies the journal to the registry and the cash ledger, in sequence, exactly once.

The journal is the system of record; the registry's blocks and the ledger's balances follow it.
:func:`project` takes the journal entries after the consumer's stored position, turns them into
a plan (clearing/settlement.py: payments, delivery-versus-payment trades, encumbrances), and
applies the plan and the new position in one transaction. A crash anywhere loses either the whole
batch or nothing, and the next run starts from the stored position, so every entry — every trade
in particular — is applied exactly once. The primary key of ``settled_trades`` and the unique
``(kind, ref)`` of ledger entries make a second settlement of a trade impossible even for a buggy
caller.
"""

from __future__ import annotations

import asyncpg
import orjson

from clearing.settlement import Plan, plan, postings
from exchange import registry
from exchange.accounts import SYSTEM_CUSTODY, SYSTEM_FEES
from exchange.journal import read

NAME = "projector"
BATCH = 5_000


async def position(conn: asyncpg.Connection, name: str = NAME) -> int:
    """How far the consumer `name` has applied the journal (0 before its first run)."""
    return await conn.fetchval("SELECT coalesce((SELECT seq FROM journal_consumers WHERE name = $1), 0)", name)


async def project(conn: asyncpg.Connection, limit: int = BATCH, upto: int | None = None) -> int:
    """Apply up to `limit` journal entries past the stored position; returns how many."""
    async with conn.transaction():
        await conn.execute("INSERT INTO journal_consumers (name, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING", NAME)
        # The row lock makes concurrent projectors take turns instead of applying twice.
        start = await conn.fetchval("SELECT seq FROM journal_consumers WHERE name = $1 FOR UPDATE", NAME)
        rows = await read(conn, start, limit, upto)
        if not rows:
            return 0
        work = plan((r["seq"], r["ts"], orjson.loads(r["events"])) for r in rows)
        await _apply(conn, work)
        await conn.execute("UPDATE journal_consumers SET seq = $2 WHERE name = $1", NAME, work.last_seq)
        return len(rows)


async def catch_up(conn: asyncpg.Connection, upto: int | None = None, limit: int = BATCH) -> int:
    """Project until the journal (or `upto`) is fully applied; returns the entries applied."""
    done = 0
    while n := await project(conn, limit, upto):
        done += n
    return done


async def _system_ids(conn: asyncpg.Connection) -> tuple[int, int]:
    rows = await conn.fetch("SELECT code, id FROM accounts WHERE code = ANY($1::text[])", [SYSTEM_CUSTODY, SYSTEM_FEES])
    ids = {r["code"]: r["id"] for r in rows}
    return ids[SYSTEM_CUSTODY], ids[SYSTEM_FEES]


async def _apply(conn: asyncpg.Connection, work: Plan) -> None:
    if work.payments or work.trades:
        custody, fees = await _system_ids(conn)
        cash = postings(work, custody, fees)
        keys = dict.fromkeys((kind, ref) for kind, ref, _, _ in cash)
        # Trades whose every posting is zero (a value that rounds to 0 fen) still get an entry.
        keys.update(dict.fromkeys(("trade", t.reference) for t in work.trades))
        entry_rows = await conn.fetch(
            "INSERT INTO ledger_entries (kind, ref) SELECT * FROM unnest($1::text[], $2::text[]) "
            "RETURNING id, kind, ref",
            [k for k, _ in keys], [r for _, r in keys])
        entry_id = {(r["kind"], r["ref"]): r["id"] for r in entry_rows}
        if cash:
            await conn.execute(
                "INSERT INTO postings (entry_id, account_id, amount_fen) "
                "SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])",
                [entry_id[(k, r)] for k, r, _, _ in cash], [a for _, _, a, _ in cash], [x for _, _, _, x in cash])
        if work.payments:
            p = work.payments
            await conn.execute(
                "INSERT INTO payments (account_id, direction, amount_fen, reference, entry_id) "
                "SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])",
                [x.account for x in p], [x.direction for x in p], [x.amount for x in p], [x.reference for x in p],
                [entry_id[(x.direction, x.reference)] for x in p])
        if work.trades:
            t = work.trades
            await conn.copy_records_to_table(
                "settled_trades",
                records=[(x.symbol, x.trade_id, x.seq, x.ts, x.buyer, x.seller, x.price, x.qty, x.value,
                          x.buyer_fee, x.seller_fee) for x in t],
                columns=("symbol", "trade_id", "seq", "ts", "buyer_id", "seller_id", "price_fen", "qty_kg",
                         "value_fen", "buyer_fee_fen", "seller_fee_fen"))
    if work.moves:
        issuances = {s: tuple(await registry.resolve_issuances(conn, symbol=s)) for s in work.symbols}
        await registry.apply_movements(conn, [
            registry.ByQuantity(issuances[m.symbol], m.from_account, m.from_state, m.to_account, m.to_state, m.qty,
                                m.cause, m.reference)
            for m in work.moves
        ])
