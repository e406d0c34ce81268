"""Crash test: `carbonx serve` killed with SIGKILL between a retirement's take in the core and its
change in the registry. The take is journaled (durable) first; the registry's transaction is held
up on a lock the test takes, and the process is killed while it waits, so the change is never
made. The next start must give the credits back as they were taken: the tonnes bought today go
back locked (T+1), not sellable. It gave them back sellable before (the start's comparison with
the registry saw only more credits than the core knew).
"""

from __future__ import annotations

import threading
import time

import asyncpg
import httpx
import orjson
import pytest

from exchange.reconcile import Reconciliation, reconcile
from tests.api_helpers import SYMBOL, build_world, client, db_rows, ok, operator_key
from tests.test_crash_offsets import Serve


def _holding(h: httpx.Client) -> dict:
    return next(x for x in ok(h.get("/v1/account"))["holdings"] if x["symbol"] == SYMBOL)


def _retirement_takes(run, db: str) -> list[dict]:
    rows = db_rows(run, db, "SELECT command FROM journal ORDER BY seq")
    return [c for c in (orjson.loads(r["command"]) for r in rows) if c.get("cause") == "retirement"]


@pytest.mark.slow
def test_a_retirement_killed_between_take_and_change_keeps_todays_purchase_locked(db, run, tmp_path) -> None:
    ops_key = run(operator_key(db))
    server = Serve(db, tmp_path)
    try:
        w = build_world(server.http, ops_key)
        with w.as_("DEV") as dev, w.as_("BUY") as buy:
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "35.00", "quantity": "3.000"}))
            ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "35.00", "quantity": "3.000"}))
            held = _holding(buy)
            assert (held["available"], held["locked"]) == ("0.000", "3.000"), held  # bought today: T+1
        # Every INSERT into retirements waits for this lock: the change's transaction stops there.
        blocker = run(asyncpg.connect(db))
        run(blocker.execute("BEGIN; LOCK TABLE retirements IN SHARE MODE"))
        answer: list = []

        def retire() -> None:
            with client(server.http, w.keys["BUY"]) as c:
                try:
                    answer.append(c.post("/v1/retirements", json={
                        "symbol": SYMBOL, "quantity": "2.000", "beneficiary": "Expo 2026", "purpose": "offset"}))
                except httpx.HTTPError as e:  # the server was killed: no answer
                    answer.append(e)

        t = threading.Thread(target=retire, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while not db_rows(run, db, "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                   "WHERE c.relname = 'retirements' AND NOT l.granted"):
            assert time.monotonic() < deadline, "the retirement never reached the registry"
            time.sleep(0.02)
        assert [c["credits"] for c in _retirement_takes(run, db)] == [[[SYMBOL, run(_account(db, "BUY")), -2000, 2000]]]
        server.kill()
        t.join(30)
        assert answer and isinstance(answer[0], httpx.HTTPError), answer
        run(blocker.execute("ROLLBACK"))
        run(blocker.close())
        assert db_rows(run, db, "SELECT count(*) AS n FROM retirements")[0]["n"] == 0

        server = Serve(db, tmp_path)
        with client(server.http, w.keys["BUY"]) as buy:
            held = _holding(buy)
            assert (held["available"], held["locked"]) == ("0.000", "3.000"), held
            r = buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00", "quantity": "1.000"})
            assert r.status_code == 422 and r.json()["code"] == "insufficient_credits", r.text
            # The retirement can be made now, of the same tonnes, and only once.
            ok(buy.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "2.000", "beneficiary": "Expo 2026",
                                                 "purpose": "offset"}), 201)
            held = _holding(buy)
            assert (held["available"], held["locked"]) == ("0.000", "1.000"), held
    finally:
        server.kill()
    result = run(_reconciled(db))
    assert result.ok, result.checks


async def _reconciled(db: str) -> Reconciliation:
    conn = await asyncpg.connect(db)
    try:
        return await reconcile(conn)
    finally:
        await conn.close()


async def _account(db: str, code: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return await conn.fetchval("SELECT id FROM accounts WHERE code = $1", code)
    finally:
        await conn.close()
