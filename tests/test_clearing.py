"""Clearing on a real PostgreSQL: the day's report, reconcile, exactly-once settlement across a
killed settling process, malformed and duplicate trade records, the daily close, and
conservation of cash and credits after random trading.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import signal
import subprocess
import sys
import time

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clearing.settlement import MalformedEntry, check_trade
from exchange import journal, projector, registry
from exchange.cli import app
from exchange.reconcile import reconcile
from matching import events as E
from matching.engine import local_ts
from matching.units import fee_fen
from tests.registry_helpers import fingerprint, world
from tests.test_service import SYMBOL, Clock, _listed, _started, place

DAY = local_ts(2026, 11, 23, 10, 0)


def _cli(db: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"DATABASE_URL": db})
    return result.exit_code, result.output


async def _trading_day(db: str) -> tuple[int, int]:
    """DEV sells to BUY three times on 2026-11-23; returns (dev, buy)."""
    svc, dev, buy = await _listed(db, clock=Clock(DAY))
    try:
        await svc.submit({"op": "deposit", "account": buy, "amount": 1_000_000, "ref": "bank-1"})
        await svc.submit(place(dev, E.ASK, 3500, 5000))
        await svc.submit(place(buy, E.BID, 3600, 3000))  # 3 t at 35.00
        await svc.submit(place(dev, E.ASK, 3700, 2000))
        await svc.submit(place(buy, E.BID, 3700, 4000))  # 2 t at 35.00, then 2 t at 37.00
        assert await svc.reconcile() == []
        return dev, buy
    finally:
        await svc.stop()


def test_the_days_report_adds_up(db, run, tmp_path):
    run(_trading_day(db))
    out = tmp_path / "day.csv"
    code, text = _cli(db, "clearing", "report", "--date", "2026-11-23", "--out", str(out))
    assert code == 0, text
    assert "3 trades" in text and "VWAP 35.57" in text
    rows = {(r["section"], r["account"], r["symbol"]): r for r in csv.DictReader(io.StringIO(out.read_text()))}
    # Buyer is the taker (10 bp), seller the maker (5 bp); each fee rounded half-up per trade.
    buyer_fees = fee_fen(10500, 10) + fee_fen(7000, 10) + fee_fen(7400, 10)
    seller_fees = fee_fen(10500, 5) + fee_fen(7000, 5) + fee_fen(7400, 5)
    assert (buyer_fees, seller_fees) == (11 + 7 + 7, 5 + 4 + 4)
    buy = rows[("account", "BUY", SYMBOL)]
    assert (buy["bought_t"], buy["bought_cny"], buy["fees_cny"], buy["net_cash_cny"], buy["net_credits_t"]) == (
        "7.000", "249.00", "0.25", "-249.25", "7.000")
    dev = rows[("account", "DEV", SYMBOL)]
    assert (dev["sold_t"], dev["sold_cny"], dev["fees_cny"], dev["net_cash_cny"], dev["net_credits_t"]) == (
        "7.000", "249.00", "0.13", "248.87", "-7.000")
    inst = rows[("instrument", "", SYMBOL)]
    assert (inst["trades"], inst["volume_t"], inst["value_cny"], inst["vwap"], inst["close"]) == (
        "3", "7.000", "249.00", "35.57", "35.57")
    code, text = _cli(db, "clearing", "report", "--date", "2026-11-24", "--out", str(tmp_path / "empty.csv"))
    assert code == 0 and "0 trades" in text
    code, text = _cli(db, "clearing", "report", "--date", "23/11/2026")
    assert code == 1 and "invalid_date" in text


def test_the_close_is_the_next_days_reference_price(db, run):
    async def main():
        await _trading_day(db)
        clock = Clock(local_ts(2026, 11, 24, 9, 30))
        svc = await _started(db, clock=clock)
        try:
            dev, buy = await svc.account("DEV"), await svc.account("BUY")
            first = await svc.submit(place(buy, E.BID, 3400, 1000))
            close = orjson.loads((await journal.read(svc._conn, first.seq - 2, 1))[0]["events"])
            assert close == [[35, SYMBOL, (DAY + 8 * 3_600_000_000) // 86_400_000_000, 3557, 7000]]
            assert svc.core.listings[SYMBOL].rules.reference_price == 3557
            # ±10% around 35.57: 32.02 .. 39.12
            assert (await svc.submit(place(buy, E.BID, 3201, 1000))).code == "price_out_of_band"
            assert (await svc.submit(place(dev, E.ASK, 3913, 1000))).code == "price_out_of_band"
            assert (await svc.submit(place(dev, E.ASK, 3912, 1000))).accepted
        finally:
            await svc.stop()

    run(main())


def test_reconcile_passes_then_finds_tampering(db, run):
    run(_trading_day(db))
    code, text = _cli(db, "reconcile")
    assert code == 0, text
    assert text.count("ok  ") == 5 and "3 journaled trades, each settled exactly once" in text

    async def tamper():
        conn = await asyncpg.connect(db)
        try:
            # A settled trade that the journal never had, and cash that appeared from nowhere.
            buyer = await conn.fetchval("SELECT id FROM accounts WHERE code = 'BUY'")
            await conn.execute(
                "INSERT INTO settled_trades (symbol, trade_id, seq, ts, buyer_id, seller_id, price_fen, qty_kg, "
                "value_fen, buyer_fee_fen, seller_fee_fen) VALUES ($1, 99, 1, 0, $2, $2, 1, 1000, 1, 0, 0)",
                SYMBOL, buyer)
            entry = await conn.fetchval(
                "INSERT INTO ledger_entries (kind, ref) VALUES ('adjustment', 'x') RETURNING id")
            custody = await conn.fetchval("SELECT id FROM accounts WHERE code = 'CX-CUSTODY'")
            await conn.execute("INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 100), "
                               "($1, $3, -100)", entry, buyer, custody)
        finally:
            await conn.close()

    run(tamper())
    code, text = _cli(db, "reconcile")
    assert code == 1
    assert "FAIL settlement" in text and f"settled trade ('{SYMBOL}', 99) not in the journal" in text
    # cash that appeared while the exchange was stopped is what its next start takes in: named, pending
    assert "ok   reservations" in text and "taken in at its next start: BUY +1.00 CNY" in text
    assert "ok   ledger" in text  # still balanced: the tampering was double entry


def test_reconcile_while_the_exchange_trades_sees_one_moment(db, run):
    """reconcile reads in one snapshot: run again and again while orders trade and settle, it
    always passes (read statement by statement it saw the journal, ledger and registry at
    different moments and failed 3 runs in 4 during trading)."""
    async def main():
        svc, dev, buy = await _listed(db, consumer_delay=0)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 10_000_000, "ref": "bank-1"})

            async def trade() -> None:
                for _ in range(150):
                    await svc.submit(place(dev, E.ASK, 3500, 1000))
                    await svc.submit(place(buy, E.BID, 3500, 1000))

            trader = asyncio.create_task(trade())
            conn = await asyncpg.connect(db)
            try:
                runs = 0
                while not trader.done() or runs < 3:
                    result = await reconcile(conn)
                    assert result.ok, [c for c in result.checks if not c.ok]
                    runs += 1
            finally:
                await conn.close()
            await trader
            assert runs >= 3
        finally:
            await svc.stop()

    run(main())


def test_malformed_or_duplicate_trade_records_are_refused_without_effect(db, run):
    good = [E.EV_TRADE, SYMBOL, 1, 2, 1, 3, 4, E.BID, 3500, 1000, 3500, 4, 2]
    check_trade(good)
    for bad in ([*good[:9], -1000, *good[10:]], [*good[:10], 3501, *good[11:]], [*good[:11], 9999, 2],
                [*good[:8], "35.00", *good[9:]], good[:12], [*good[:5], 0, *good[6:]]):
        with pytest.raises(MalformedEntry):
            check_trade(bad)

    async def main():
        dev, buy = await _trading_day(db)
        conn = await asyncpg.connect(db)
        try:
            before = (await fingerprint(conn), await projector.position(conn))
            last = await journal.last_seq(conn)
            forged = [E.EV_TRADE, SYMBOL, 4, last + 1, 3, buy, dev, E.BID, 3500, 1000, 3499, 0, 0]
            await journal.append(conn, [(last + 1, DAY, orjson.dumps({"op": "forged"}), orjson.dumps([forged]))])
            with pytest.raises(MalformedEntry):
                await projector.project(conn)
            assert (await fingerprint(conn), await projector.position(conn)) == before
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(
                    "INSERT INTO settled_trades (symbol, trade_id, seq, ts, buyer_id, seller_id, price_fen, qty_kg, "
                    "value_fen, buyer_fee_fen, seller_fee_fen) SELECT symbol, trade_id, seq, ts, buyer_id, "
                    "seller_id, price_fen, qty_kg, value_fen, buyer_fee_fen, seller_fee_fen FROM settled_trades "
                    "WHERE trade_id = 1")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO ledger_entries (kind, ref) VALUES ('trade', $1)", f"trade:{SYMBOL}:1")
        finally:
            await conn.close()

    run(main())


def test_settlement_survives_sigkill_mid_batch_exactly_once(db, run, tmp_path):
    """Journal thousands of trades with projection off, then settle them in a subprocess that is
    killed several times mid-batch; every trade ends up settled exactly once."""

    async def journal_trades() -> int:
        conn = await asyncpg.connect(db)
        await world(conn)
        await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=20_000_000)
        await conn.close()
        svc = await _started(db, project=False)
        try:
            await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10})
            dev, buy = await svc.account("DEV"), await svc.account("BUY")
            await svc.submit({"op": "deposit", "account": buy, "amount": 10**10, "ref": "bank-1"})
            for _ in range(8):  # many single-lot trades per group commit
                outs = await asyncio.gather(*[
                    svc.submit(place(dev, E.ASK, 3500 + i % 4, 1000) if i % 2 else place(buy, E.BID, 3504, 1000))
                    for i in range(3000)])
                assert {o.code for o in outs} == {None}
            return svc.core.trade_ids[SYMBOL]
        finally:
            await svc.stop()

    trades = run(journal_trades())
    entries = run(_ask(db, journal.last_seq))
    assert trades > 3000
    env = {**os.environ, "DATABASE_URL": db}
    kills, attempts, progress = 0, 0, []
    rng = random.Random(5)
    while kills < 4 and attempts < 12 and (not progress or progress[-1] < entries):
        attempts += 1
        before = progress[-1] if progress else 0
        proc = subprocess.Popen([sys.executable, "-m", "exchange", "clearing", "settle", "--batch", "300",
                                 "--data-dir", str(tmp_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Kill once it has committed a batch (a fixed delay raced the start-up on a loaded
            # machine: four kills before any work), a little later each time, so the kill lands
            # at different points of the next batches.
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if run(_ask(db, projector.position)) > before:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        progress.append(run(_ask(db, projector.position)))
    done = subprocess.run([sys.executable, "-m", "exchange", "clearing", "settle", "--data-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    async def check():
        conn = await asyncpg.connect(db)
        try:
            assert await conn.fetchval("SELECT count(*) FROM settled_trades") == trades
            assert await conn.fetchval("SELECT count(DISTINCT trade_id) FROM settled_trades") == trades
            result = await reconcile(conn)
            assert result.ok and result.pending == 0, result.checks
        finally:
            await conn.close()

    run(check())
    assert kills >= 2, "the settling process kept finishing before the kill; the test proved little"
    assert len(set(progress)) >= 2  # killed at different points of the work, each time mid-run
    print(f"settling killed {kills} times; positions after each attempt: {progress}")


async def _ask(db: str, question) -> int:
    """`question(conn)` on a short-lived connection to `db`."""
    conn = await asyncpg.connect(db)
    try:
        return await question(conn)
    finally:
        await conn.close()


commands = st.lists(
    st.tuples(st.sampled_from(["buy", "sell", "ioc_buy", "market_buy", "cancel", "deposit", "withdraw", "day"]),
              st.integers(0, 2), st.integers(-3, 3), st.integers(1, 4)),
    min_size=10, max_size=60)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=commands)
def test_cash_and_credits_are_conserved_after_random_trading(pg_server, template_db, run, steps):
    from exchange.database import drop_database, ensure_database, with_database

    name = f"cx_conserve_{os.getpid()}_{random.randrange(1 << 30)}"
    run(ensure_database(pg_server, name, template=template_db))
    dsn = with_database(pg_server, name)

    async def main():
        conn = await asyncpg.connect(dsn)
        await conn.execute("SELECT 1")
        await world(conn)
        from exchange.accounts import create_account

        await create_account(conn, "BUY2", "Second buyer", "enterprise")
        clock = Clock(DAY)
        svc = await _started(dsn, clock=clock)
        await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 7, "taker_bp": 13})
        members = [await svc.account(c) for c in ("DEV", "BUY", "BUY2")]
        deposits = withdrawals = 0
        for i, (op, who, dp, lots) in enumerate(steps):
            account = members[who]
            price = 3500 + dp * 7
            if op == "day":
                clock.ts += 86_400_000_000
                continue
            clock.ts += 1_000_000
            if op == "deposit":
                out = await svc.submit({"op": "deposit", "account": account, "amount": 50_000 * lots, "ref": f"d{i}"})
                deposits += 50_000 * lots if out.accepted else 0
            elif op == "withdraw":
                out = await svc.submit({"op": "withdraw", "account": account, "amount": 9_999 * lots, "ref": f"w{i}"})
                withdrawals += 9_999 * lots if out.accepted else 0
            elif op == "cancel":
                mine = [k for k, o in svc.core.orders.items() if o[1] == account]
                if mine:
                    assert (await svc.submit({"op": "cancel", "account": account, "order_id": mine[0]})).accepted
            elif op == "market_buy":
                await svc.submit({**place(account, E.BID, 0, lots * 1000), "kind": E.MARKET, "cash_cap": 3600 * lots})
            else:
                side = E.ASK if op == "sell" else E.BID
                extra = {"tif": E.IOC} if op == "ioc_buy" else {}
                await svc.submit({**place(account, side, price, lots * 1000), **extra})
        assert await svc.reconcile() == []
        await svc.stop()
        fees = await conn.fetchval("SELECT coalesce(sum(buyer_fee_fen + seller_fee_fen), 0) FROM settled_trades")
        member_cash = await conn.fetchval(
            "SELECT coalesce(sum(balance_fen), 0) FROM cash_balances b JOIN accounts a ON a.id = b.account_id "
            "WHERE a.role <> 'system'")
        assert member_cash + fees == deposits - withdrawals
        assert await conn.fetchval("SELECT balance_fen FROM cash_balances b JOIN accounts a ON a.id = b.account_id "
                                   "WHERE a.code = 'CX-FEES'") == fees
        held = await conn.fetchval("SELECT sum(upper(serials) - lower(serials)) FROM blocks")
        assert held == 100_000
        result = await reconcile(conn)
        assert result.ok, result.checks
        await conn.close()

    try:
        run(main())
    finally:
        run(drop_database(pg_server, name))
