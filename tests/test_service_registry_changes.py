"""Registry changes made through the running service (retire, freeze, issue, ...) against what
goes on around them: a stop() that is itself cancelled, a change begun after stop(), a database
connection lost before the change or while it commits, a change task cancelled, and the order
history while the projector is held at a take (review24, review25; the review23 cases are in
test_service.py)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from exchange import registry
from exchange.errors import CarbonxError
from matching import events as E
from tests.test_service import SYMBOL, _dev_listed, _started, place


async def _fails_unrefused(svc, monkeypatch) -> None:
    """DEV's retirement of 10 t, which the patched registry makes fail other than by a refusal."""
    with pytest.raises(Exception) as failed:
        await svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo", purpose="offset", symbol=SYMBOL)
    monkeypatch.undo()
    assert not isinstance(failed.value, CarbonxError), failed.value


def test_cancelling_stop_does_not_cancel_a_registry_change_under_way(db, run, monkeypatch):
    """A stop() that is itself cancelled (wait_for, a cancelled main task) while it waits for a
    retirement under way: the retirement still runs to its end (a gather there cancelled it
    before its commit, leaving the core's take without change or give-back: review24)."""
    async def main():
        svc, dev = await _dev_listed(db)
        retire, began = registry.retire, asyncio.Event()

        async def slow(conn, dry_run=False, **kw):
            if not dry_run:
                began.set()
                await asyncio.sleep(0.5)  # the statements of a big retirement, a lock wait
            return await retire(conn, dry_run=dry_run, **kw)

        monkeypatch.setattr(registry, "retire", slow)
        caller = asyncio.ensure_future(svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo",
                                                  purpose="offset", symbol=SYMBOL))
        await began.wait()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(svc.stop(), 0.1)
        r = await asyncio.gather(caller, return_exceptions=True)
        monkeypatch.undo()
        try:
            retired = await svc.pool.fetchval("SELECT count(*) FROM retirements")
            problems = await svc.reconcile()
            assert retired == 1 and svc.core.credits[SYMBOL][dev][:3] == [90_000, 0, 0], r
            assert problems == [], problems
        finally:
            await svc.stop()

    run(main())


def test_a_change_that_surely_did_not_commit_gives_the_credits_back(db, run, monkeypatch):
    """The change's connection is lost before the retirement's first statement (a server restart,
    a network blip, pg_terminate_backend): not a refusal, so the service reads the registry,
    finds it as it was (the projector is held at the take) and gives the credits back; they used
    to stay taken until a restart (review24)."""
    async def main():
        svc, dev = await _dev_listed(db)
        retire = registry.retire

        async def lost(conn, dry_run=False, **kw):
            if not dry_run:
                other = await asyncpg.connect(db)
                await other.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                await other.close()
                await asyncio.sleep(0.1)
            return await retire(conn, dry_run=dry_run, **kw)

        monkeypatch.setattr(registry, "retire", lost)
        try:
            await _fails_unrefused(svc, monkeypatch)
            assert await svc.pool.fetchval("SELECT count(*) FROM retirements") == 0
            problems = await svc.reconcile()
            assert svc.core.credits[SYMBOL][dev][:3] == [100_000, 0, 0] and problems == []
        finally:
            await svc.stop()

    run(main())


@pytest.mark.parametrize("consumers", ["task", "process"])
def test_order_history_is_not_held_by_a_registry_change(db, run, monkeypatch, consumers):
    """While a registry change holds the projector, order history (GET /v1/orders, fills,
    candles, trade pages, an offset's wait for its purchase) follows what is durable, in the
    consumers' own process too (it was held with the projector there: review24)."""
    async def main():
        svc, dev = await _dev_listed(db, consumers=consumers)
        retire, began = registry.retire, asyncio.Event()

        async def slow(conn, dry_run=False, **kw):
            if not dry_run:
                began.set()
                await asyncio.sleep(1.5)
            return await retire(conn, dry_run=dry_run, **kw)

        monkeypatch.setattr(registry, "retire", slow)
        try:
            change = asyncio.ensure_future(svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo",
                                                      purpose="offset", symbol=SYMBOL))
            await began.wait()
            out = await svc.submit(place(dev, E.ASK, 5000, 10_000))
            assert out.accepted
            t = time.monotonic()
            try:
                await svc.caught_up(orders=True, timeout=1.0)
                waited = time.monotonic() - t
            except CarbonxError as e:
                waited = f"timed out: {e.message}"
            await change
            assert isinstance(waited, float) and waited < 0.5, waited
        finally:
            monkeypatch.undo()
            await svc.stop()

    run(main())


def test_a_change_begun_after_stop_began_is_refused_before_the_registry_changes(db, run):
    """A registry change called once stop() is under way (an embedding program, a task not
    stopped first) is refused before it touches the registry; issue() used to make the issuance
    and then fail to journal its adjust, which the next start took in as an outside change."""
    async def main():
        svc, _dev = await _dev_listed(db)
        stopping = asyncio.ensure_future(svc.stop())
        await asyncio.sleep(0)  # stop() is past its wait for changes, at its gather of the loops
        before = await svc.pool.fetchval("SELECT count(*) FROM issuances")
        try:
            await svc.issue(project="FOREST", vintage=2023, quantity_kg=5_000, to_account="DEV")
            outcome = "issued"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        await stopping
        conn = await asyncpg.connect(db)
        after = await conn.fetchval("SELECT count(*) FROM issuances")
        await conn.close()
        assert outcome != "issued" and after == before, (outcome, before, after)

    run(main())


def test_a_change_called_while_stop_waits_for_one_under_way_is_refused(db, run):
    """stop() waits for a retirement under way (its commit held 1 s by a trigger); a second
    retirement called meanwhile is refused `unavailable` and touches nothing. It used to be
    accepted and waited for, so changes arriving one after another could hold a stop off."""
    async def main():
        svc, dev = await _dev_listed(db)
        c = await asyncpg.connect(db)
        await c.execute(SLOW_COMMIT)
        try:
            first = asyncio.ensure_future(svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo",
                                                     purpose="offset", symbol=SYMBOL))
            for _ in range(500):  # until the retirement is in the registry's hands
                if await c.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"):
                    break
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(svc.stop())
            await asyncio.sleep(0.05)
            assert not stopping.done()
            with pytest.raises(CarbonxError) as refused:
                await svc.retire(account="DEV", quantity_kg=5_000, beneficiary="Fair", purpose="offset",
                                 symbol=SYMBOL)
            assert refused.value.code == "unavailable"
            assert (await first).quantity_kg == 10_000
            await stopping
            assert await c.fetchval("SELECT array_agg(quantity_kg) FROM retirements") == [10_000]
        finally:
            await c.execute("DROP TRIGGER slow_commit ON retirements")
            await c.close()
            await svc.stop()
        again = await _started(db)
        try:
            assert again.core.credits[SYMBOL][dev][:3] == [90_000, 0, 0] and await again.reconcile() == []
        finally:
            await again.stop()

    run(main())


SLOW_COMMIT = """
CREATE OR REPLACE FUNCTION slow_commit_commit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(1.0); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON retirements
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_commit();
"""


def test_connection_lost_during_commit_is_not_given_back(db, run, monkeypatch):
    """The client loses the change's connection while the server is still committing it (the
    server finishes it). The service asks PostgreSQL how the change's transaction ended, waits
    while it is in progress, finds it committed and keeps the credits taken. A look at the
    holdings right away saw the registry as it was and gave them back (review25)."""
    async def main():
        svc, dev = await _dev_listed(db)
        c = await asyncpg.connect(db)
        await c.execute(SLOW_COMMIT)
        retire = registry.retire

        cut: list[asyncio.Task] = []

        async def cut_in_commit(conn: asyncpg.Connection) -> None:
            pid = conn.get_server_pid()
            for _ in range(500):  # until the backend sleeps inside the COMMIT (the deferred trigger)
                if await c.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid=$1", pid) == "PgSleep":
                    conn.terminate()  # the client side goes (network blip, proxy); the server goes on
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the change never reached its COMMIT")

        async def lost_in_commit(conn, dry_run=False, **kw):
            if not dry_run:
                cut.append(asyncio.ensure_future(cut_in_commit(conn)))
            return await retire(conn, dry_run=dry_run, **kw)

        monkeypatch.setattr(registry, "retire", lost_in_commit)
        try:
            await _fails_unrefused(svc, monkeypatch)
            await cut[0]
            retired = await c.fetchval("SELECT count(*) FROM retirements")
            problems = await svc.reconcile()
            assert retired == 1 and svc.core.credits[SYMBOL][dev][:3] == [90_000, 0, 0]
            assert problems == [], problems
        finally:
            await c.execute("DROP TRIGGER slow_commit ON retirements")
            await c.close()
            await svc.stop()

    run(main())


def test_cancelled_before_the_change_is_asked_gives_back(db, run, monkeypatch):
    """The change task itself is cancelled (loop teardown, a KeyboardInterrupt) while it waits for
    the take to be projected, before the registry is asked: the credits go back (review25)."""
    async def main():
        svc, dev = await _dev_listed(db)
        caught_up = svc.caught_up
        waiting = asyncio.Event()

        async def slow_caught_up(seq=None, **kw):
            if seq is not None and svc._project_hold == seq:
                waiting.set()
                await asyncio.sleep(5)
            return await caught_up(seq, **kw)

        svc.caught_up = slow_caught_up
        try:
            caller = asyncio.ensure_future(svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo",
                                                      purpose="offset", symbol=SYMBOL))
            await waiting.wait()
            (task,) = list(svc._changes)
            task.cancel()
            await asyncio.gather(caller, return_exceptions=True)
            del svc.caught_up
            retired = await svc.pool.fetchval("SELECT count(*) FROM retirements")
            problems = await svc.reconcile()
            assert retired == 0 and problems == [], (svc.core.credits[SYMBOL][dev][:3], problems)
        finally:
            await svc.stop()

    run(main())
