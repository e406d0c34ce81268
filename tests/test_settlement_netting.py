"""The fast settlement path against the per-movement path it replaced.

Random trading is journaled with projection off; copies of the database are then settled three
ways: by a reference projector that moves each batch's credits in journal order through one
`registry.apply_movements` call (the path before this change, BlockPlan), by the projector in
journal order (`net=False`, `registry.StepBatch`) and by the projector netted (the default).
Journal order must give exactly the reference's blocks and transfer rows; netted must give the
same settled trades, ledger entries, postings and balances, the same credits per instrument,
account and state (netting may deliver other serials, even of another issuance of the symbol),
one transfer row per trade moving its quantity from the seller's encumbered credits to the
buyer, and a transfer history that replays to its final blocks. One batch that netting cannot
apply (credits bought and resold in it, T+1 off) must fall back and still settle.
"""

from __future__ import annotations

import os
import random
import urllib.parse

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing.settlement import plan
from exchange import projector, registry
from exchange.accounts import create_account
from exchange.database import drop_database, ensure_database, with_database
from exchange.journal import read
from exchange.reconcile import reconcile
from matching import events as E
from matching.engine import local_ts
from tests.registry_helpers import cover_violations, world
from tests.test_service import SYMBOL, Clock, _started, place

DAY = local_ts(2026, 11, 23, 10, 0)


async def _reference_project(conn: asyncpg.Connection, limit: int) -> int:
    """projector.project as it was before netting: the batch's movements in journal order through
    one `registry.apply_movements` call (BlockPlan), its cash through the same statement."""
    async with conn.transaction():
        await conn.execute("INSERT INTO journal_consumers (name, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                           projector.NAME)
        start = await conn.fetchval("SELECT seq FROM journal_consumers WHERE name = $1 FOR UPDATE", projector.NAME)
        rows = await read(conn, start, limit)
        if not rows:
            return 0
        work = plan((r["seq"], r["ts"], orjson.loads(r["events"])) for r in rows)
        if work.payments or work.trades:
            await projector._apply_cash(conn, work, *await projector._system_ids(conn))
        if work.moves:
            ids = {s: tuple(await registry.resolve_issuances(conn, symbol=s)) for s in work.symbols}
            await registry.apply_movements(conn, [registry.ByQuantity(
                ids[m.symbol], m.from_account, m.from_state, m.to_account, m.to_state, m.qty, m.cause, m.reference)
                for m in work.moves])
        await conn.execute("UPDATE journal_consumers SET seq = $2 WHERE name = $1", projector.NAME, work.last_seq)
        return len(rows)


async def _state(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        result = await reconcile(conn)
        assert result.ok and result.pending == 0, result.checks
        assert await cover_violations(conn) == []
        q = {
            "settled": "SELECT symbol, trade_id, seq, ts, buyer_id, seller_id, price_fen, qty_kg, value_fen, "
                       "buyer_fee_fen, seller_fee_fen FROM settled_trades ORDER BY 1, 2",
            "entries": "SELECT e.kind, e.ref, p.account_id, p.amount_fen FROM ledger_entries e "
                       "LEFT JOIN postings p ON p.entry_id = e.id ORDER BY 1, 2, 3, 4",
            "balances": "SELECT account_id, balance_fen FROM cash_balances ORDER BY 1",
            "payments": "SELECT account_id, direction, amount_fen, reference FROM payments ORDER BY reference",
            # per instrument (project vintage): netting may deliver another issuance of it
            "holdings": "SELECT i.project_id, i.vintage, b.owner_account_id, b.state, "
                        "sum(upper(b.serials) - lower(b.serials)) "
                        "FROM blocks b JOIN issuances i ON i.id = b.issuance_id "
                        "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
            "blocks": "SELECT issuance_id, lower(serials), upper(serials), owner_account_id, state FROM blocks "
                      "ORDER BY 1, 2",
            "transfers": "SELECT issuance_id, lower(serials), upper(serials), from_account_id, from_state, "
                         "to_account_id, to_state, cause, cause_ref FROM transfers ORDER BY id",
        }
        return {k: [tuple(r) for r in await conn.fetch(sql)] for k, sql in q.items()}
    finally:
        await conn.close()


def _replay(transfers: list[tuple]) -> list[tuple]:
    """The blocks that the transfer history, applied in order, leaves (adjacent holdings merged);
    every transfer must move serials its source held in its source state."""
    held: dict[int, list[list]] = {}  # issuance -> [lo, hi, owner, state] sorted, non-overlapping
    for iss, lo, hi, fo, fs, to, ts, _cause, _ref in transfers:
        blocks = held.setdefault(iss, [])
        if fo is not None:
            covered = 0
            out = []
            for b in blocks:
                if b[1] <= lo or b[0] >= hi:
                    out.append(b)
                    continue
                assert (b[2], b[3]) == (fo, fs), f"transfer {(iss, lo, hi, fo, fs)} finds {b}"
                covered += min(b[1], hi) - max(b[0], lo)
                if b[0] < lo:
                    out.append([b[0], lo, b[2], b[3]])
                if b[1] > hi:
                    out.append([hi, b[1], b[2], b[3]])
            assert covered == hi - lo, f"transfer {(iss, lo, hi, fo, fs)} moves serials its source does not hold"
            blocks[:] = out
        blocks.append([lo, hi, to, ts])
        blocks.sort()
    result = []
    for iss in sorted(held):
        run = None
        for lo, hi, owner, state in held[iss]:
            if run and run[2] == lo and (run[3], run[4]) == (owner, state):
                run[2] = hi
                continue
            if run:
                result.append(tuple(run))
            run = [iss, lo, hi, owner, state]
        if run:
            result.append(tuple(run))
    return result


def _check_netted_against_reference(netted: dict, ref: dict, trades: list[tuple]) -> None:
    for key in ("settled", "entries", "balances", "payments", "holdings"):
        assert netted[key] == ref[key], key
    # One transfer row per trade (single issuance here), naming it, seller encumbered -> buyer available.
    by_ref: dict[str, list[tuple]] = {}
    for t in netted["transfers"]:
        if t[7] == "trade":
            by_ref.setdefault(t[8], []).append(t)
    assert sorted(by_ref) == sorted(f"trade:{s}:{tid}" for s, tid, *_ in trades)
    for symbol, tid, _seq, _ts, buyer, seller, _price, qty, *_ in trades:
        rows = by_ref[f"trade:{symbol}:{tid}"]
        assert sum(r[2] - r[1] for r in rows) == qty
        assert all((r[3], r[4], r[5], r[6]) == (seller, "encumbered", buyer, "available") for r in rows)
    assert _replay(netted["transfers"]) == netted["blocks"]
    assert _replay(ref["transfers"]) == ref["blocks"]


async def _three_ways(pg_server: str, source: str, limit: int) -> tuple[dict, dict, dict]:
    """Settle copies of database `source` by reference, journal order and netted; their states."""
    out = []
    for how in ("reference", "journal", "netted"):
        name = f"{source}_{how}"
        await ensure_database(pg_server, name, template=source)
        dsn = with_database(pg_server, name)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                if how == "reference":
                    while await _reference_project(conn, limit):
                        pass
                else:
                    await projector.catch_up(conn, limit=limit, net=how == "netted")
            finally:
                await conn.close()
            out.append(await _state(dsn))
        finally:
            await drop_database(pg_server, name)
    return out[0], out[1], out[2]


commands = st.lists(
    st.tuples(st.sampled_from(["buy", "sell", "sell", "ioc_buy", "cancel", "amend", "deposit", "withdraw", "day"]),
              st.integers(0, 2), st.integers(-3, 3), st.integers(1, 4)),
    min_size=10, max_size=80)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=commands, t1=st.booleans(), limit=st.sampled_from([3, 7, 25, 5000]))
def test_netted_settlement_matches_per_movement_settlement(pg_server, template_db, run, steps, t1, limit):
    name = f"cx_net_{os.getpid()}_{random.randrange(1 << 30)}"
    run(ensure_database(pg_server, name, template=template_db))
    dsn = with_database(pg_server, name)

    async def journal_random_trading() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await world(conn)
            await create_account(conn, "BUY2", "Second buyer", "enterprise")
            await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=20_000, to_account="BUY2")
        finally:
            await conn.close()
        clock = Clock(DAY)
        svc = await _started(dsn, clock=clock, project=False)
        try:
            await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 7, "taker_bp": 13,
                                               "t1": t1})
            members = [await svc.account(c) for c in ("DEV", "BUY", "BUY2")]
            for m in members:
                await svc.submit({"op": "deposit", "account": m, "amount": 400_000, "ref": f"seed-{m}"})
            for i, (op, who, dp, lots) in enumerate(steps):
                account = members[who]
                if op == "day":
                    clock.ts += 86_400_000_000
                    continue
                clock.ts += 1_000_000
                mine = [k for k, o in svc.core.orders.items() if o[1] == account]
                if op == "deposit":
                    await svc.submit({"op": "deposit", "account": account, "amount": 50_000 * lots, "ref": f"d{i}"})
                elif op == "withdraw":
                    await svc.submit({"op": "withdraw", "account": account, "amount": 9_999 * lots, "ref": f"w{i}"})
                elif op == "cancel":
                    if mine:
                        await svc.submit({"op": "cancel", "account": account, "order_id": mine[0]})
                elif op == "amend":
                    if mine:
                        await svc.submit({"op": "amend", "account": account, "order_id": mine[-1],
                                          "price": 3500 + dp * 7, "qty": lots * 1000})
                else:
                    side = E.ASK if op == "sell" else E.BID
                    extra = {"tif": E.IOC} if op == "ioc_buy" else {}
                    await svc.submit({**place(account, side, 3500 + dp * 7, lots * 1000), **extra})
        finally:
            await svc.stop()

    async def main() -> None:
        await journal_random_trading()
        ref, journal_order, netted = await _three_ways(pg_server, name, limit)
        for key in ref:  # the same blocks, transfer rows, cash, settled trades: everything
            assert journal_order[key] == ref[key], (key, steps, t1, limit, journal_order[key], ref[key])
        _check_netted_against_reference(netted, ref, ref["settled"])

    try:
        run(main())
    finally:
        run(drop_database(pg_server, name))


def test_a_batch_that_nets_badly_falls_back_to_journal_order(db, pg_server, run, monkeypatch):
    """T+1 off: BUY2, holding nothing, buys 3 t and sells them on in the same batch. Netted, its
    encumbrance would come before the purchase and find nothing; the batch falls back."""
    replans = []
    original = registry.StepBatch.replan
    monkeypatch.setattr(registry.StepBatch, "replan", lambda self, steps: (replans.append(len(steps)),
                                                                           original(self, steps))[1])

    async def main() -> None:
        conn = await asyncpg.connect(db)
        try:
            await world(conn)
            await create_account(conn, "BUY2", "Second buyer", "enterprise")
        finally:
            await conn.close()
        svc = await _started(db, clock=Clock(DAY), project=False)
        try:
            await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10,
                                               "t1": False})
            dev, buy, buy2 = [await svc.account(c) for c in ("DEV", "BUY", "BUY2")]
            for m in (buy, buy2):
                assert (await svc.submit({"op": "deposit", "account": m, "amount": 500_000, "ref": f"d{m}"})).accepted
            assert (await svc.submit(place(dev, E.ASK, 3500, 3000))).accepted
            assert (await svc.submit(place(buy2, E.BID, 3500, 3000))).accepted  # BUY2 buys 3 t
            assert (await svc.submit(place(buy2, E.ASK, 3600, 3000))).accepted  # and sells them on
            assert (await svc.submit(place(buy, E.BID, 3600, 2000))).accepted
            assert (await svc.submit({"op": "cancel", "account": buy2,
                                      "order_id": next(iter(svc.core.orders))})).accepted
        finally:
            await svc.stop()
        base = urllib.parse.urlsplit(db).path.lstrip("/")
        ref, journal_order, netted = await _three_ways(pg_server, base, 5000)
        assert journal_order == ref
        assert netted == ref  # the fallback is journal order itself
        _check_netted_against_reference(netted, ref, ref["settled"])
        assert len(ref["settled"]) == 2
        assert replans, "the netted plan should have failed and fallen back"
        holdings = {(owner, state): kg for _project, _vintage, owner, state, kg in ref["holdings"]}
        assert holdings[(buy, "available")] == 2000 and (buy2, "encumbered") not in holdings

    run(main())


def test_keys_checked_per_statement_are_still_enforced(conn, run):
    """0005 checks the keys of postings, transfers and settled_trades once per statement instead
    of a foreign key per row (0007: without locking rows of append-only tables): raw SQL naming a
    missing row is still refused, naming the key, and an account they name cannot be deleted or
    renumbered."""

    async def body():
        iss = await world(conn)
        dev = await conn.fetchval("SELECT id FROM accounts WHERE code = 'DEV'")
        custody = await conn.fetchval("SELECT id FROM accounts WHERE code = 'CX-CUSTODY'")
        entry = await conn.fetchval("INSERT INTO ledger_entries (kind, ref) VALUES ('adjustment', 'k') RETURNING id")
        bad = [
            ("INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 5), ($1, $3, -5)",
             entry, dev, 10**9),
            ("INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 5), ($1, $3, -5)",
             10**9, dev, custody),
            ("INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, to_state, "
             "cause, cause_ref) VALUES ($1, int8range(1, 2), $2, 'available', $3, 'available', 'transfer', 'x')",
             10**9, dev, dev),
            ("INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, to_state, "
             "cause, cause_ref) VALUES ($1, int8range(1, 2), $2, 'available', $3, 'available', 'transfer', 'x')",
             iss.id, dev, 10**9),
            ("INSERT INTO settled_trades (symbol, trade_id, seq, ts, buyer_id, seller_id, price_fen, qty_kg, "
             "value_fen, buyer_fee_fen, seller_fee_fen) VALUES ('X', 1, $1, 0, $2, $3, 1, 1, 0, 0, 0)",
             10**9, dev, dev),
        ]
        for sql, *args in bad:
            with pytest.raises(asyncpg.ForeignKeyViolationError, match="1000000000"):
                await conn.execute(sql, *args)
        # 0007 checks keys into append-only tables without locking them: those tables must then
        # refuse TRUNCATE as well as UPDATE and DELETE.
        for table in ("ledger_entries", "journal", "issuances", "settled_trades", "payments", "postings"):
            with pytest.raises(asyncpg.CheckViolationError, match="append-only"):
                await conn.execute(f"TRUNCATE {table} CASCADE")
        await conn.execute("INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 5), ($1, $3, -5)",
                           entry, dev, custody)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute("DELETE FROM accounts WHERE id = $1", dev)
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("UPDATE accounts SET id = DEFAULT WHERE id = $1", dev)
        assert await conn.fetchval("SELECT count(*) FROM accounts WHERE id = $1", dev) == 1

    run(body())


def test_steps_given_after_the_lock_must_stay_within_it(conn, run):
    """The projector locks a batch's holders and accounts first and builds its steps while the
    server writes the cash: steps reading an unlocked holder or moving to an unlocked account are
    refused, steps within the lock are planned and written."""

    async def body():
        iss = await world(conn)
        dev, buy, ops = [await conn.fetchval("SELECT id FROM accounts WHERE code = $1", c)
                         for c in ("DEV", "BUY", "OPS")]
        async with conn.transaction():
            batch = registry.StepBatch((), [(dev, "available", iss.id)], {buy})
            await batch.lock(conn)
            for bad in (registry.Step((iss.id,), buy, "available", dev, "available", 1000, "transfer", "x"),
                        registry.Step((iss.id,), dev, "available", ops, "available", 1000, "transfer", "x")):
                with pytest.raises(AssertionError):
                    batch.plan([bad])
            batch.plan([registry.Step((iss.id,), dev, "available", buy, "available", 1000, "transfer", "ok")])
            await batch.write(conn)
        assert await conn.fetch("SELECT cause_ref, upper(serials) - lower(serials) AS kg, to_account_id FROM transfers "
                                "WHERE cause_ref = 'ok'") == [("ok", 1000, buy)]
        assert await cover_violations(conn) == []

    run(body())
