"""`carbonx reconcile`: proofs over the whole database, each a named check with its evidence.

- the journal is contiguous (sequence numbers 1..n, no gap);
- the ledger: all postings sum to zero and every stored balance equals the sum of its postings;
- settlement: every trade in the journal up to the projector's position has exactly one
  ``settled_trades`` row and one ledger entry, and there is no settled trade the journal lacks;
- the registry: per issuance, the blocks cover exactly the issued range, and available +
  encumbered + frozen + retired + cancelled = issued;
- the core: rebuilt from the journal up to the projector's position, its reservations agree with
  its open orders and books, and the registry's encumbered and available credits and the ledger's
  member balances agree with it.

Entries journaled but not yet projected (after a crash, before the service restarts) are reported
as pending, not as a failure: the next start settles them. So are the changes made to member
cash and available credits while the exchange was stopped (the command line), which its next start
takes in (exchange/service.outside_changes); encumbered credits differing is a failure all the same.

Everything is read in one REPEATABLE READ snapshot: read statement by statement, a running
exchange moved the journal, the ledger and the registry between them and reconcile reported
differences that never existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import orjson

from exchange import journal, ledger, projector
from exchange.errors import CarbonxError
from exchange.service import REGISTRY_CHANGE_KEY, SERVICE_LOCK_KEY, compare_with_database, outside_changes
from matching import events as E
from matching.units import format_cash, format_tonnes


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Reconciliation:
    checks: list[Check] = field(default_factory=list)
    pending: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], fine: str) -> None:
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
        self.checks.append(Check(name, not problems, shown if problems else fine))


async def reconcile(conn: asyncpg.Connection) -> Reconciliation:
    if conn.is_in_transaction():
        return await _reconcile(conn)
    # The snapshot is taken between a running service's registry changes (it holds the lock
    # through each, until what it journaled is projected), then the lock is let go.
    await conn.execute("SELECT pg_advisory_lock_shared($1)", REGISTRY_CHANGE_KEY)
    held = True
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SELECT pg_advisory_unlock_shared($1)", REGISTRY_CHANGE_KEY)
            held = False
            return await _reconcile(conn)
    finally:
        if held and not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock_shared($1)", REGISTRY_CHANGE_KEY)


async def _serving(conn: asyncpg.Connection) -> bool:
    free = await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", SERVICE_LOCK_KEY)
    if free:
        await conn.execute("SELECT pg_advisory_unlock_shared($1)", SERVICE_LOCK_KEY)
    return not free


async def _reconcile(conn: asyncpg.Connection) -> Reconciliation:
    out = Reconciliation()
    last = await journal.last_seq(conn)
    count = await conn.fetchval("SELECT count(*) FROM journal")
    out.add("journal", [] if count == last else [f"{count} entries but the last is {last}: a gap"],
            f"{last:,} entries, contiguous")

    total = await ledger.ledger_total(conn)
    drift = await ledger.balances_match_postings(conn)
    out.add("ledger", ([f"postings sum to {total} fen, not 0"] if total else [])
            + [f"{code}: stored {stored}, postings {derived}" for code, stored, derived in drift],
            "postings sum to 0; every balance equals its postings")

    position = await projector.position(conn)
    out.pending = last - position
    journal_trades: set[tuple[str, int]] = set()
    problems: list[str] = []
    after = 0
    while after < position:
        rows = await journal.read(conn, after, journal.READ_CHUNK, position)
        for r in rows:
            for ev in orjson.loads(r["events"]):
                if ev[0] == E.EV_TRADE:
                    key = (ev[1], ev[2])
                    if key in journal_trades:
                        problems.append(f"trade {key} appears twice in the journal")
                    journal_trades.add(key)
        after = rows[-1]["seq"]
    settled = {(r["symbol"], r["trade_id"]) for r in await conn.fetch(
        "SELECT symbol, trade_id FROM settled_trades WHERE seq <= $1", position)}
    entries = await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'trade' AND ref LIKE 'trade:%'")
    problems += [f"journaled trade {k} not settled" for k in sorted(journal_trades - settled)[:10]]
    problems += [f"settled trade {k} not in the journal" for k in sorted(settled - journal_trades)[:10]]
    if entries != len(settled):
        problems.append(f"{entries} trade ledger entries for {len(settled)} settled trades")
    out.add("settlement", problems, f"{len(settled):,} journaled trades, each settled exactly once"
            + (f"; {out.pending:,} journal entries pending" if out.pending else ""))

    rows = await conn.fetch(
        """SELECT i.id, upper(i.serials) - lower(i.serials) AS issued,
                  coalesce(sum(upper(b.serials) - lower(b.serials)), 0)::bigint AS covered,
                  min(lower(b.serials)) = lower(i.serials) AND max(upper(b.serials)) = upper(i.serials) AS ends
           FROM issuances i LEFT JOIN blocks b ON b.issuance_id = i.id GROUP BY i.id ORDER BY i.id""")
    out.add("registry", [f"issuance {r['id']}: issued {format_tonnes(r['issued'])} t, blocks hold "
                         f"{format_tonnes(r['covered'])} t"
                         for r in rows if r["issued"] != r["covered"] or not r["ends"]],
            f"{len(rows)} issuances: holdings + retired + cancelled = issued")

    core = await journal.recover(conn, upto=position)
    adjusted = ""
    if not await _serving(conn):
        try:
            cash, credits = await outside_changes(conn, core)
        except CarbonxError:
            cash = credits = []  # an encumbrance differs: the comparison below names it
        if cash or credits:
            core.apply({"op": "adjust", "cash": cash, "credits": credits}, core.ts)
            codes = dict(await conn.fetch("SELECT id, code FROM accounts WHERE id = ANY($1::bigint[])",
                                          [a for a, _ in cash] + [a for _, a, _ in credits]))
            named = [f"{codes.get(a, a)} {'+' if d > 0 else '-'}{format_cash(abs(d))} CNY" for a, d in cash] + [
                f"{codes.get(a, a)} {'+' if d > 0 else '-'}{format_tonnes(abs(d))} t {s}" for s, a, d in credits]
            adjusted = (f"; {len(named)} changes made while the exchange was stopped, taken in at its "
                        f"next start: {', '.join(named[:10])}" + (", …" if len(named) > 10 else ""))
    out.add("reservations", core.check_invariants() + await compare_with_database(conn, core, position),
            f"{len(core.orders):,} open orders; reservations, encumbrances and balances agree at seq {position:,}"
            + adjusted)
    return out
