"""The projector's read-ahead: the next batch is read and planned during the current batch's
transaction, and used only if it is exactly what the next transaction would read.

Two races are forced: another projector moves the position between the batches (the batch read
ahead is stale and must be read again), and an entry becomes visible only after the read-ahead
(a gap; the entries after it must wait for it). In both, every journaled trade must end settled
exactly once. A malformed entry in the batch read ahead must not stop the batch before it.
"""

from __future__ import annotations

import asyncpg
import orjson

from exchange import journal, projector
from exchange.reconcile import reconcile
from matching import events as E
from tests.registry_helpers import world
from tests.test_service import SYMBOL, _started, place


async def _journal_trades(dsn: str, trades: int) -> None:
    """Single-lot trades journaled with projection off: nothing is settled yet."""
    conn = await asyncpg.connect(dsn)
    try:
        await world(conn)
    finally:
        await conn.close()
    svc = await _started(dsn, project=False)
    try:
        await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10})
        dev, buy = await svc.account("DEV"), await svc.account("BUY")
        await svc.submit({"op": "deposit", "account": buy, "amount": 10**9, "ref": "bank-1"})
        for _ in range(trades):
            assert (await svc.submit(place(dev, E.ASK, 3500, 1000))).accepted
            assert (await svc.submit(place(buy, E.BID, 3500, 1000))).accepted
    finally:
        await svc.stop()


async def _settled_exactly_once(conn: asyncpg.Connection, trades: int) -> None:
    result = await reconcile(conn)
    assert result.ok and result.pending == 0, result.checks
    assert await conn.fetchval("SELECT count(*) FROM settled_trades") == trades
    assert await conn.fetchval("SELECT count(*) FROM transfers WHERE cause = 'trade'") == trades


async def _trade_seqs(conn: asyncpg.Connection) -> list[int]:
    return [r["seq"] for r in await journal.read(conn, 0, 10**6)
            if any(ev[0] == E.EV_TRADE for ev in orjson.loads(r["events"]))]


def test_a_stale_read_ahead_is_read_again(db, run):
    async def body():
        await _journal_trades(db, 12)
        a, b = await asyncpg.connect(db), await asyncpg.connect(db)
        try:
            n, ahead, more = await projector._project(a, 5, None, True, None, True)
            assert n == 5 and more and ahead is not None and ahead.after == await projector.position(a)
            assert await projector.project(b, 4) == 4  # another projector takes the batch read ahead
            n, ahead, _ = await projector._project(a, 5, None, True, ahead, True)
            assert n == 5  # read again after the position b left, not the stale entries
            await projector.catch_up(a, limit=5)
            await _settled_exactly_once(a, 12)
        finally:
            await a.close()
            await b.close()

    run(body())


def test_an_entry_that_appears_after_the_read_ahead_is_not_skipped(db, run, monkeypatch):
    async def body():
        await _journal_trades(db, 6)
        conn = await asyncpg.connect(db)
        try:
            late = (await _trade_seqs(conn))[2]  # a trade entry, made invisible to the first read ahead
            first = late - 1  # the first batch ends just before it
            real_read = journal.read
            hidden = []

            async def read(c, after, limit=journal.READ_CHUNK, upto=None):
                rows = await real_read(c, after, limit, upto)
                if after == first and not hidden:
                    hidden.append(after)
                    return [r for r in rows if r["seq"] != late]  # committed a moment later
                return rows

            monkeypatch.setattr(projector, "read", read)
            n, ahead, more = await projector._project(conn, first, None, True, None, True)
            assert n == first and hidden and more and ahead is None  # a gap: nothing planned ahead
            await projector.catch_up(conn, limit=first)
            await _settled_exactly_once(conn, 6)
        finally:
            await conn.close()

    run(body())


def test_a_malformed_entry_read_ahead_does_not_stop_the_batch_before_it(db, run):
    async def body():
        await _journal_trades(db, 3)
        conn = await asyncpg.connect(db)
        try:
            last = await journal.last_seq(conn)
            bad = [[E.EV_TRADE, SYMBOL, 99, 0, 0, 1, 2, E.BID, 3500, 1000, 1, 0, 0]]  # value is not price x qty
            await conn.execute("INSERT INTO journal (seq, ts, command, events) VALUES ($1, 0, $2, $3)",
                               last + 1, b"{}", orjson.dumps(bad))
            n, ahead, more = await projector._project(conn, last, None, True, None, True)
            assert n == last and more and ahead is None
            assert await projector.position(conn) == last
            assert await conn.fetchval("SELECT count(*) FROM settled_trades") == 3
        finally:
            await conn.close()

    run(body())
