"""Settlement throughput: journaled trades settled into the registry and the ledger per second.

Run:  python -m pytest bench/bench_clearing.py --benchmark-only -s
      (CARBONX_BENCH_TRADES=N sets the number of trades, default 6,000)

Set-up (not timed): a seller holding max(10,000, N + 1,000) t and a funded buyer trade single lots
through the exchange service with projection switched off, so the journal holds N trades (each
with the sell order's encumbrance) and nothing is settled; the database is then copied. Timed:
the projector settling the whole journal (``projector.catch_up``, which reads and plans each next
batch while the server writes the current one) — per trade one ledger entry with its postings, one
``settled_trades`` row and one registry transfer from the seller's encumbered blocks to the
buyer, plus the encumbrances, in batches of B journal entries per transaction — once with the
registry movements netted per batch (the default) and, on the copy, once in journal order
(``net=False``). Baselines, in the same run: journal order, and planning the same entries in
memory (clearing/settlement.py, no database), which shows how much of the cost is the database.
The projector runs under the garbage-collector policy of the consumers process it runs in
(exchange/gcpolicy.py). Also reported: the CPU the database backend (read from /proc, when the
server is local) and this process spent per trade while settling netted -- steadier than rates
on a shared machine.
Aim (issue #5): >= 20,000 settled trades/s. Reported, never asserted; what is asserted is that
afterwards every trade is settled exactly once, reconcile passes on both copies, and both hold
the same settled trades, balances and credits per account and state.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse

import asyncpg
import orjson
import pytest

from clearing.settlement import plan
from exchange import gcpolicy, journal, projector, registry
from exchange.database import drop_database, ensure_database, with_database
from exchange.reconcile import reconcile
from exchange.service import ExchangeService
from matching import events as E
from tests.registry_helpers import world

SYMBOL = "FOREST-2023"
TRADES = int(os.environ.get("CARBONX_BENCH_TRADES", "6000"))


async def _journal_trades(dsn: str, n: int) -> int:
    conn = await asyncpg.connect(dsn)
    await world(conn)
    await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=max(10_000, n + 1_000) * 1000)
    await conn.close()
    svc = ExchangeService(dsn, project=False)
    await svc.start()
    try:
        await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10})
        dev, buy = await svc.account("DEV"), await svc.account("BUY")
        await svc.submit({"op": "deposit", "account": buy, "amount": 10**12, "ref": "bank-1"})
        while svc.core.trade_ids[SYMBOL] < n:
            k = min(2000, n - svc.core.trade_ids[SYMBOL])
            await asyncio.gather(*[
                svc.submit({"op": "place", "account": dev if i % 2 else buy, "symbol": SYMBOL,
                            "side": E.ASK if i % 2 else E.BID, "price": 3500 + (i // 2) % 3 if i % 2 else 3510,
                            "qty": 1000}) for i in range(2 * k)])
        return svc.core.trade_ids[SYMBOL]
    finally:
        await svc.stop()


@pytest.mark.parametrize("batch", [1000, 5000])
def test_settle_journaled_trades(benchmark, request, db, pg_server, run, batch):
    trades = run(_journal_trades(db, TRADES))

    async def entries() -> list:
        conn = await asyncpg.connect(db)
        try:
            return [(r["seq"], r["ts"], orjson.loads(r["events"])) for r in await journal.read(conn, 0, 10**9)]
        finally:
            await conn.close()

    rows = run(entries())
    gc_before = gcpolicy.apply()  # the collector policy of the consumers process, where the projector runs
    request.addfinalizer(lambda: gcpolicy.undo(gc_before))
    t0 = time.perf_counter()
    planned = plan(rows)
    plan_s = time.perf_counter() - t0
    assert len(planned.trades) == trades

    source = urllib.parse.urlsplit(db).path.lstrip("/")
    copy = f"{source}_journal_order"
    run(ensure_database(pg_server, copy, template=source))
    copy_dsn = with_database(pg_server, copy)

    cpu: dict[bool, tuple[float | None, float]] = {}

    async def settle(dsn: str, net: bool) -> float:
        conn = await asyncpg.connect(dsn)
        try:
            backend = conn.get_server_pid()
            db0, py0 = _backend_cpu(backend), time.process_time()
            t = time.perf_counter()
            await projector.catch_up(conn, limit=batch, net=net)
            elapsed = time.perf_counter() - t
            db1 = _backend_cpu(backend)
            cpu[net] = (db1 - db0 if db0 is not None and db1 is not None else None, time.process_time() - py0)
            return elapsed
        finally:
            await conn.close()

    async def state(dsn: str) -> tuple:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM settled_trades") == trades
            assert await conn.fetchval("SELECT count(*) FROM transfers WHERE cause = 'trade'") >= trades
            result = await reconcile(conn)
            assert result.ok, result.checks
            return (
                await conn.fetch("SELECT symbol, trade_id, seq, buyer_id, seller_id, price_fen, qty_kg, value_fen, "
                                 "buyer_fee_fen, seller_fee_fen FROM settled_trades ORDER BY 1, 2"),
                await conn.fetch("SELECT account_id, balance_fen FROM cash_balances ORDER BY 1"),
                await conn.fetch("SELECT owner_account_id, state, sum(upper(serials) - lower(serials)) FROM blocks "
                                 "GROUP BY 1, 2 ORDER BY 1, 2"))
        finally:
            await conn.close()

    try:
        journal_order_s = run(settle(copy_dsn, False))
        reference = run(state(copy_dsn))
    finally:
        run(drop_database(pg_server, copy))
    seconds = benchmark.pedantic(lambda: run(settle(db, True)), rounds=1, iterations=1)
    assert run(state(db)) == reference
    rate = trades / seconds
    line = (f"batch {batch:>5}: {trades:,} trades ({len(rows):,} journal entries, {len(planned.moves):,} registry "
            f"movements) in {seconds:.2f} s = {rate:,.0f} settled trades/s netted; journal order "
            f"{trades / journal_order_s:,.0f}/s ({journal_order_s / seconds:.2f}x); planning alone "
            f"{trades / plan_s:,.0f}/s (database share {1 - plan_s / seconds:.0%}); aim 20,000/s")
    db_cpu, py_cpu = cpu[True]
    line += (f"; CPU per trade netted: database {db_cpu / trades * 1e6:.1f} us, " if db_cpu is not None
             else "; CPU per trade netted: database not measurable (server not local), ")
    line += f"Python {py_cpu / trades * 1e6:.1f} us"
    print(line)
    benchmark.extra_info.update({"trades": trades, "trades_per_s": rate,
                                 "journal_order_per_s": trades / journal_order_s,
                                 "plan_per_s": trades / plan_s, "db_cpu_us_per_trade":
                                 None if db_cpu is None else db_cpu / trades * 1e6,
                                 "py_cpu_us_per_trade": py_cpu / trades * 1e6})


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) the database backend `pid` has used, from /proc; None when
    the server is not on this machine. Less disturbed by the machine's other load than rates."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
