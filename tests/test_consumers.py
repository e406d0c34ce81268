"""The journal consumers in their own process (exchange/consumers.py, ``consumers="process"``).

- They follow the service: after random trading the registry, the ledger and the order history
  equal what the in-process consumers write from the same journal (a second database replays it).
- A caller who waits for them (``caught_up``) is not kept waiting for the gathering delay.
- Their process dying stops the service (``unavailable``), as a failing in-process consumer does.
- The service killed with SIGKILL does not leave them behind: they apply what was durable and exit.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import asyncpg
import pytest

from exchange import consumers
from exchange.errors import CarbonxError
from exchange.service import ExchangeService
from matching import events as E
from tests.registry_helpers import world

SYMBOL = "FOREST-2023"
LISTING = {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10}


async def _listed(dsn: str, **options) -> tuple[ExchangeService, int, int]:
    conn = await asyncpg.connect(dsn)
    await world(conn)
    await conn.close()
    svc = ExchangeService(dsn, **options)
    await svc.start()
    assert (await svc.list_instrument(SYMBOL, LISTING)).accepted
    dev, buy = await svc.account("DEV"), await svc.account("BUY")
    assert (await svc.submit({"op": "deposit", "account": buy, "amount": 50_000_000, "ref": "bank-1"})).accepted
    return svc, dev, buy


async def _trade_randomly(svc: ExchangeService, dev: int, buy: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        side, who = (E.ASK, dev) if rng.random() < 0.5 else (E.BID, buy)
        cmd = {"op": "place", "account": who, "symbol": SYMBOL, "side": side,
               "price": rng.randrange(3400, 3600), "qty": rng.randrange(1, 20) * 1000}
        if rng.random() < 0.2 and svc.core.orders:
            oid = rng.choice(sorted(svc.core.orders))
            cmd = {"op": "cancel", "account": svc.core.orders[oid][1], "order_id": oid}
        await svc.submit(cmd)


TABLES = {
    # Batches may cut the journal differently in the two runs, and netting is per batch: which
    # serials a trade delivers may differ, the quantities and the money may not.
    "ledger": "SELECT a.code, sum(p.amount_fen) FROM postings p JOIN accounts a ON a.id = p.account_id "
              "GROUP BY a.code ORDER BY a.code",
    "settled": "SELECT symbol, trade_id, qty_kg, value_fen FROM settled_trades ORDER BY symbol, trade_id",
    "blocks": "SELECT owner_account_id, state, sum(upper(serials) - lower(serials)) FROM blocks "
              "GROUP BY 1, 2 ORDER BY 1, 2",
    "orders": "SELECT order_id, status, filled_kg, remaining_kg FROM orders ORDER BY order_id",
    "fills": "SELECT trade_id, order_id, qty_kg, fee_fen FROM fills ORDER BY trade_id, order_id",
    "positions": "SELECT name, seq FROM journal_consumers ORDER BY name",
}


async def _tables(dsn: str) -> dict[str, list]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for name, sql in TABLES.items():
            out[name] = [tuple(r) for r in await conn.fetch(sql)]
        return out
    finally:
        await conn.close()


def test_process_consumers_write_what_in_process_consumers_write(pg_server, template_db, run):
    from exchange.database import drop_database, ensure_database, with_database

    names = [f"cx_consumers_{os.getpid()}_{mode}" for mode in ("process", "task")]
    dsns = []
    try:
        for name in names:
            run(ensure_database(pg_server, name, template=template_db))
            dsns.append(with_database(pg_server, name))

        async def main(dsn: str, mode: str) -> dict[str, list]:
            # A fixed clock: both runs then journal the same timestamps and fees.
            svc, dev, buy = await _listed(dsn, consumers=mode, clock=lambda: 1_790_000_000_000_000)
            try:
                await _trade_randomly(svc, dev, buy, 400, seed=7)
                t = time.perf_counter()
                await svc.caught_up(registry=True, orders=True)
                assert time.perf_counter() - t < 5
                assert await svc.reconcile() == []
                if mode == "process":
                    assert svc._child is not None and svc._child.returncode is None
            finally:
                await svc.stop()
            return await _tables(dsn)

        got = {mode: run(main(dsn, mode)) for dsn, mode in zip(dsns, ("process", "task"), strict=True)}
        assert got["process"]["settled"], "the random trading traded"
        assert got["process"] == got["task"]
    finally:
        for name in names:
            run(drop_database(pg_server, name))


def test_a_waiting_caller_cuts_the_gathering_delay_short(db, run):
    async def main():
        svc, dev, _ = await _listed(db, consumers="process", consumer_delay=5.0)
        try:
            await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3500,
                              "qty": 1000})
            t = time.perf_counter()
            await svc.caught_up(registry=True, orders=True)
            assert time.perf_counter() - t < 2.5, "caught_up waited for the 5 s gathering delay"
        finally:
            await svc.stop()

    run(main())


def test_the_consumers_process_dying_stops_the_service(db, run):
    async def main():
        svc, dev, _ = await _listed(db, consumers="process")
        try:
            os.kill(svc._child.pid, signal.SIGKILL)
            for _ in range(200):
                if svc.failure is not None:
                    break
                await asyncio.sleep(0.02)
            assert svc.failure is not None, "the service kept serving without its consumers"
            with pytest.raises(CarbonxError) as e:
                await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3500,
                                  "qty": 1000})
            assert e.value.code == "unavailable"
        finally:
            await svc.stop()

    run(main())


SERVE = textwrap.dedent("""
    import asyncio, sys
    from exchange.service import ExchangeService
    from matching import events as E

    async def main(dsn):
        svc = ExchangeService(dsn, consumers="process", consumer_delay=0.2)
        await svc.start()
        assert (await svc.list_instrument("FOREST-2023", {"rules": {"always_open": True}})).accepted
        dev = await svc.account("DEV")
        for i in range(50):
            await svc.submit({"op": "place", "account": dev, "symbol": "FOREST-2023", "side": E.ASK,
                              "price": 3500 + i, "qty": 1000})
        print(svc._child.pid, svc.core.seq, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
""")


def test_a_killed_service_does_not_leave_its_consumers_behind(db, run):
    async def prepare():
        conn = await asyncpg.connect(db)
        await world(conn)
        await conn.close()
    run(prepare())
    proc = subprocess.Popen([sys.executable, "-c", SERVE, db], stdout=subprocess.PIPE, text=True)
    try:
        child, seq = map(int, proc.stdout.readline().split())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not _running(child):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the consumers process outlived the service killed with SIGKILL")

    async def positions():
        conn = await asyncpg.connect(db)
        try:
            return dict(await conn.fetch("SELECT name, seq FROM journal_consumers"))
        finally:
            await conn.close()
    # Everything durable before the kill was applied on the way out (the 0.2 s gathering delay
    # had not passed for the last orders when the service died).
    assert positions_at_least(run(positions()), seq)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def positions_at_least(got: dict[str, int], seq: int) -> bool:
    assert got.get("projector", 0) >= seq and got.get("history", 0) >= seq, (got, seq)
    return True


def test_a_hurry_read_together_with_its_position_is_not_lost(db, run):
    """The parent announces a position and then hurries for it; the child often reads both lines
    before its followers run again. Each follower must then apply at once, not gather for the
    whole delay (clearing the hurry when the gathering began lost it, and every caught_up in
    process mode waited a full delay). Each follower spends its own hurry."""

    async def main():
        applied: dict[str, float] = {}

        def recorder(name: str):
            async def apply(conn, upto: int) -> int:
                applied.setdefault(name, time.perf_counter())
                return upto
            return apply

        c = consumers.Consumers(db, delay=5.0, say=lambda line: None)
        tasks = [asyncio.create_task(c.follow(name, recorder(name))) for name in ("projector", "history")]
        await asyncio.sleep(0.3)  # both followers connected and waiting for an announcement
        t = time.perf_counter()
        c.announce(5)
        c.hurry_up()
        for _ in range(200):
            if len(applied) == 2:
                break
            await asyncio.sleep(0.01)
        c.stop()
        await asyncio.gather(*tasks)
        return {name: at - t for name, at in applied.items()}

    took = run(main())
    assert set(took) == {"projector", "history"}, took
    assert max(took.values()) < 1.0, f"a hurry was lost: applied after {took} s with a 5 s delay"
