"""Settlement throughput: journaled trades settled into the registry and the ledger per second.

Run:  python -m pytest bench/bench_clearing.py --benchmark-only -s
      (CARBONX_BENCH_TRADES=N sets the number of trades, default 6,000)

Set-up (not timed): a seller holding 10,000 t and a funded buyer trade single lots through the
exchange service with projection switched off, so the journal holds N trades (each with the sell
order's encumbrance) and nothing is settled. Timed: the projector settling the whole journal —
per trade one ledger entry with its postings, one ``settled_trades`` row and one registry
movement from the seller's encumbered blocks to the buyer, plus the encumbrances, in batches of
B journal entries per transaction. Baseline, in the same run: planning the same entries in
memory (clearing/settlement.py, no database), which shows how much of the cost is the database.
Aim (issue #5): >= 20,000 settled trades/s. Reported, never asserted; what is asserted is that
afterwards every trade is settled exactly once and reconcile passes.
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import orjson
import pytest

from clearing.settlement import plan
from exchange import journal, projector, registry
from exchange.reconcile import reconcile
from exchange.service import ExchangeService
from matching import events as E
from tests.registry_helpers import world

SYMBOL = "FOREST-2023"
TRADES = int(os.environ.get("CARBONX_BENCH_TRADES", "6000"))


async def _journal_trades(dsn: str, n: int) -> int:
    conn = await asyncpg.connect(dsn)
    await world(conn)
    await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=10_000_000)
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
def test_settle_journaled_trades(benchmark, db, run, batch):
    trades = run(_journal_trades(db, TRADES))

    async def entries() -> list:
        conn = await asyncpg.connect(db)
        try:
            return [(r["seq"], r["ts"], orjson.loads(r["events"])) for r in await journal.read(conn, 0, 10**9)]
        finally:
            await conn.close()

    rows = run(entries())
    t0 = time.perf_counter()
    planned = plan(rows)
    plan_s = time.perf_counter() - t0
    assert len(planned.trades) == trades

    async def settle() -> float:
        conn = await asyncpg.connect(db)
        try:
            t = time.perf_counter()
            await projector.catch_up(conn, limit=batch)
            return time.perf_counter() - t
        finally:
            await conn.close()

    seconds = benchmark.pedantic(lambda: run(settle()), rounds=1, iterations=1)

    async def check() -> None:
        conn = await asyncpg.connect(db)
        try:
            assert await conn.fetchval("SELECT count(*) FROM settled_trades") == trades
            result = await reconcile(conn)
            assert result.ok, result.checks
        finally:
            await conn.close()

    run(check())
    rate = trades / seconds
    line = (f"batch {batch:>5}: {trades:,} trades ({len(rows):,} journal entries, {len(planned.moves):,} registry "
            f"movements) in {seconds:.2f} s = {rate:,.0f} settled trades/s; planning alone {trades / plan_s:,.0f}/s "
            f"(database share {1 - plan_s / seconds:.0%}); aim 20,000/s")
    print(line)
    benchmark.extra_info.update({"trades": trades, "trades_per_s": rate, "plan_per_s": trades / plan_s})
