"""The exchange service on a real PostgreSQL: durability, recovery, projection, refusals.

Each test gets a fresh database (root conftest.py) with the small world of registry_helpers: DEV
holds 100 t of FOREST-2023, BUY and OPS exist. The service runs in-process; the crash tests with
a killed subprocess are in test_crash.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import asyncpg
import orjson
import pytest

from exchange import journal, ledger, offsetting, projector, registry
from exchange import service as service_module
from exchange.errors import CarbonxError
from exchange.serials import format_serial
from exchange.service import SERVICE_LOCK_KEY, SUMMARY_ITEMS, ExchangeService, adjustment_summary, refuse_while_serving
from matching import events as E
from matching.core import P_AVAILABLE, ExchangeCore, trading_day
from matching.engine import local_ts
from tests.registry_helpers import cover_violations, fingerprint, world

SYMBOL = "FOREST-2023"
LISTING = {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10}


class Clock:
    """A settable clock for the service (UTC microseconds)."""

    def __init__(self, ts: int) -> None:
        self.ts = ts

    def __call__(self) -> int:
        return self.ts


async def _started(dsn: str, **options) -> ExchangeService:
    svc = ExchangeService(dsn, **options)
    await svc.start()
    return svc


async def _world_started(db: str, **options) -> ExchangeService:
    """A service on the registry world of tests.registry_helpers (DEV holding 100 t, nothing listed)."""
    conn = await asyncpg.connect(db)
    await world(conn)
    await conn.close()
    return await _started(db, **options)


async def _dev_listed(db: str, **options) -> tuple[ExchangeService, int]:
    """DEV holding 100 t of the listed SYMBOL."""
    svc = await _world_started(db, **options)
    assert (await svc.list_instrument(SYMBOL, LISTING)).accepted
    return svc, await svc.account("DEV")


async def _listed(dsn: str, listing: dict = LISTING, funds: int = 0, **options) -> tuple[ExchangeService, int, int]:
    """A world, a service, SYMBOL listed; BUY given `funds` fen (reference bank-1) if any."""
    conn = await asyncpg.connect(dsn)
    await world(conn)
    await conn.close()
    svc = await _started(dsn, **options)
    out = await svc.list_instrument(SYMBOL, listing)
    assert out.accepted, out
    dev, buy = await svc.account("DEV"), await svc.account("BUY")
    if funds:
        assert (await svc.submit({"op": "deposit", "account": buy, "amount": funds, "ref": "bank-1"})).accepted
    return svc, dev, buy


def place(account: int, side: int, price: int, qty: int, **extra) -> dict:
    return {"op": "place", "account": account, "symbol": SYMBOL, "side": side, "price": price, "qty": qty, **extra}


async def _journal_rows(dsn: str) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT seq, command, events FROM journal ORDER BY seq")
    finally:
        await conn.close()


def test_a_trade_settles_delivery_versus_payment(db, run):
    async def main():
        svc, dev, buy = await _listed(db)
        try:
            assert (await svc.submit({"op": "deposit", "account": buy, "amount": 1_000_000, "ref": "bank-1"})).accepted
            sell = await svc.submit(place(dev, E.ASK, 3500, 5000))
            bought = await svc.submit(place(buy, E.BID, 3600, 3000))
            trade = next(e for e in bought.events if e[0] == E.EV_TRADE)
            assert trade[1:3] == (SYMBOL, 1) and trade[8:] == (3500, 3000, 10500, 11, 5)
            assert await svc.reconcile() == []
            conn = await asyncpg.connect(db)
            try:
                row = await conn.fetchrow("SELECT * FROM settled_trades")
                assert (row["symbol"], row["trade_id"], row["qty_kg"], row["value_fen"]) == (SYMBOL, 1, 3000, 10500)
                assert await ledger.balance(conn, "BUY") == 1_000_000 - 10500 - 11
                assert await ledger.balance(conn, "DEV") == 10500 - 5
                assert await ledger.balance(conn, "CX-FEES") == 16
                assert await ledger.ledger_total(conn) == 0
                transfers = await conn.fetch(
                    "SELECT cause, cause_ref, upper(serials) - lower(serials) AS qty FROM transfers "
                    "WHERE cause <> 'issuance' ORDER BY id")
                assert [(t["cause"], t["cause_ref"], t["qty"]) for t in transfers] == [
                    ("encumber", f"order:{sell.order_id}", 5000), ("trade", f"trade:{SYMBOL}:1", 3000)]
                assert await cover_violations(conn) == []
            finally:
                await conn.close()
        finally:
            await svc.stop()

    run(main())


def test_restart_gives_the_same_state_as_a_clean_replay(db, run):
    async def main():
        svc, dev, buy = await _listed(db, snapshot_every=7)
        await svc.submit({"op": "deposit", "account": buy, "amount": 10_000_000, "ref": "bank-1"})
        outs = await asyncio.gather(*[
            svc.submit(place(dev if i % 2 else buy, i % 2, 3500 + (i % 5 - 2) * (1 if i % 2 else -1), 1000))
            for i in range(300)])
        assert {o.code for o in outs} <= {None, "insufficient_credits"}
        await svc.submit({"op": "cancel", "account": dev, "order_id": next(o.order_id for o in outs if o.accepted
                                                                          and o.order_id in svc.core.orders)})
        digest, seq = svc.core.state_digest(), svc.core.seq
        await svc.stop(snapshot=False)

        again = await _started(db)
        try:
            assert (again.core.seq, again.core.state_digest()) == (seq, digest)
            assert again.recovered < seq  # a snapshot was used
            conn = await asyncpg.connect(db)
            try:
                clean = await journal.recover(conn, use_snapshot=False)
                assert clean.state_digest() == digest
                assert await projector.position(conn) == seq
            finally:
                await conn.close()
            assert await again.reconcile() == []
        finally:
            await again.stop()

    run(main())


def test_rejected_commands_change_nothing_anywhere(db, run):
    async def main():
        svc, dev, buy = await _listed(db)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 100_000, "ref": "bank-1"})
            resting = await svc.submit(place(dev, E.ASK, 3500, 1000))
            await svc.reconcile()
            conn = await asyncpg.connect(db)
            before = (await fingerprint(conn), svc.core.state_digest(), svc.core.seq, len(await _journal_rows(db)))
            bad = [
                (place(buy, E.BID, 3600, 100_000), "insufficient_funds"),
                (place(dev, E.ASK, 3600, 200_000), "insufficient_credits"),
                (place(buy, E.BID, 3600, 1500), "invalid_lot"),
                (place(buy, E.BID, 0, 1000), "invalid_price"),
                (place(buy, E.BID, 3600, 0), "invalid_quantity"),
                ({**place(buy, E.BID, 3600, 1000), "symbol": "NOPE-2023"}, "unknown_instrument"),
                ({**place(buy, E.BID, 3600, 1000), "tif": E.GTD, "expire_ts": 1}, "invalid_expiry"),
                ({**place(buy, E.BID, 3500, 1000), "post_only": True}, "post_only_would_take"),
                ({**place(buy, E.BID, 3400, 1000), "tif": E.FOK}, "fok_not_fillable"),
                ({**place(buy, E.BID, 3600, 1000), "side": 7}, "invalid_order"),
                ({**place(buy, E.BID, 3600, 1000), "price": "36.00"}, "invalid_command"),
                ({"op": "cancel", "account": buy, "order_id": resting.order_id}, "not_found"),
                ({"op": "amend", "account": dev, "order_id": resting.order_id, "price": 3500, "qty": 500_000},
                 "insufficient_credits"),
                ({"op": "withdraw", "account": buy, "amount": 100_001, "ref": "out-1"}, "insufficient_funds"),
                ({"op": "deposit", "account": buy, "amount": 5, "ref": "bank-1"}, "duplicate_reference"),
                ({"op": "deposit", "account": buy, "amount": -5, "ref": "bank-2"}, "invalid_command"),
                ({"op": "halt", "symbol": "NOPE-2023"}, "unknown_instrument"),
                ({"op": "resume", "symbol": SYMBOL}, "not_halted"),
                ({"op": "list", "symbol": SYMBOL, "rules": {}}, "instrument_exists"),
                ({"op": "list", "symbol": "X-2023", "rules": {"rules": {"tick": 0}}}, "invalid_rules"),
                ({"op": "expire"}, "invalid_command"),
                ({"op": "teleport"}, "invalid_command"),
            ]
            for command, code in bad:
                out = await svc.submit(command)
                assert (out.seq, out.code) == (None, code), (command, out)
            await svc.reconcile()
            after = (await fingerprint(conn), svc.core.state_digest(), svc.core.seq, len(await _journal_rows(db)))
            assert after == before
            await conn.close()
        finally:
            await svc.stop()

    run(main())


def test_payments_are_idempotent_by_reference(db, run):
    async def main():
        conn = await asyncpg.connect(db)
        await world(conn)
        await ledger.deposit(conn, account="BUY", amount_fen=700, reference="before-the-service")
        svc = await _started(db)
        try:
            buy = await svc.account("BUY")
            first = await svc.submit({"op": "deposit", "account": buy, "amount": 500, "ref": "bank-9"})
            again = await svc.submit({"op": "deposit", "account": buy, "amount": 500, "ref": "bank-9"})
            assert first.accepted and again.duplicate and again.seq is None
            with pytest.raises(CarbonxError) as err:
                await svc.submit({"op": "deposit", "account": buy, "amount": 700, "ref": "before-the-service"})
            assert err.value.code == "duplicate_reference"
            out = await svc.submit({"op": "withdraw", "account": buy, "amount": 1200, "ref": "out-1"})
            assert out.accepted and svc.core.cash[buy] == [0, 0]
            assert await svc.reconcile() == []
            assert await ledger.balance(conn, "BUY") == 0
            assert await conn.fetchval("SELECT count(*) FROM payments") == 3
        finally:
            await svc.stop()
            await conn.close()

    run(main())


def test_one_service_per_database_and_the_command_line_keeps_off(db, run):
    async def main():
        svc, _, _ = await _listed(db)
        try:
            with pytest.raises(CarbonxError) as err:
                await _started(db)
            assert err.value.code == "service_running"
            conn = await asyncpg.connect(db)
            with pytest.raises(CarbonxError) as err:
                await refuse_while_serving(conn)
            assert err.value.code == "service_running"
        finally:
            await svc.stop()
        await refuse_while_serving(conn)  # free again once stopped
        await conn.close()

    run(main())


@pytest.mark.parametrize("consumers", ["task", "process"])
def test_a_failed_start_leaves_nothing_behind(db, run, consumers):
    """A start that fails after its loops (and the consumers' process) began used to leave them
    running and the service lock held: every later start in the process said service_running."""
    async def main():
        svc, _, _ = await _listed(db)
        await svc.stop()
        failing = ExchangeService(db, consumers=consumers)

        async def broken() -> None:
            raise RuntimeError("the registry could not be read")
        failing._adjust_for_outside_changes = broken
        with pytest.raises(RuntimeError, match="could not be read"):
            await failing.start()
        assert failing._tasks == [] and failing._child is None
        assert all(c is None for c in (failing._conn, failing._proj, failing._hist, failing._pool))
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("carbonx-")]
        again = await _started(db)  # the lock is free
        try:
            assert again.core.listings
        finally:
            await again.stop()

    run(main())


def test_changes_made_while_stopped_are_journaled_at_start(db, run, caplog):
    async def main():
        svc, dev, buy = await _listed(db)
        await svc.submit({"op": "deposit", "account": buy, "amount": 50_000, "ref": "bank-1"})
        await svc.submit(place(dev, E.ASK, 3500, 10_000))
        await svc.stop()
        conn = await asyncpg.connect(db)
        await ledger.deposit(conn, account="BUY", amount_fen=1_000, reference="bank-outside")
        await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=7_000)  # to the developer
        await registry.transfer(conn, from_account="DEV", to_account="BUY", symbol=SYMBOL, quantity_kg=2_000,
                                cause_ref="gift-1")
        again = await _started(db)
        try:
            last = orjson.loads((await _journal_rows(db))[-1]["command"])
            assert last["op"] == "adjust"
            assert last["cash"] == [[buy, 1_000]]
            assert sorted(last["credits"]) == sorted([[SYMBOL, dev, 5_000], [SYMBOL, buy, 2_000]])
            # The operator reads it in the API's units, by account code.
            said = [r.getMessage() for r in caplog.records if r.name == "carbonx.service"]
            assert any("BUY +10.00 CNY" in m and f"DEV +5.000 t {SYMBOL}" in m and f"BUY +2.000 t {SYMBOL}" in m
                       for m in said), said
            assert again.core.cash[buy][0] == 51_000
            assert await again.reconcile() == []
            sold = await again.submit(place(buy, E.ASK, 3500, 2_000))  # the gift can be sold now
            assert sold.accepted
            assert await again.reconcile() == []
        finally:
            await again.stop()
            await conn.close()

    run(main())


def test_an_issuance_during_a_listing_reaches_the_core(db, run):
    """A listing reads the vintage's holdings from the registry and then lists: an issuance
    landing between the two saw the symbol unlisted and left the core short of it."""
    async def main():
        svc = await _world_started(db)
        try:
            await svc.issue(project="FOREST", vintage=2019, quantity_kg=5_000)
            read = svc._registry_available

            async def slow(symbol: str) -> dict[int, int]:
                got = await read(symbol)
                await asyncio.sleep(0.3)  # the issuance below tries to land here
                return got

            svc._registry_available = slow
            listing = asyncio.create_task(svc.list_instrument("FOREST-2019", LISTING))
            await asyncio.sleep(0.1)
            await svc.issue(project="FOREST", vintage=2019, quantity_kg=2_000)
            assert (await listing).accepted
            assert svc.core.credits["FOREST-2019"][await svc.account("DEV")][P_AVAILABLE] == 7_000
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_adjustment_summary_names_changes_in_api_units_and_counts_the_rest():
    codes = {1: "TONGWEI", 2: "DEV"}
    line = adjustment_summary(10, [[1, 5_000_000], [3, -1]], [["LQS-FS-2023", 2, -1_500_500]], codes)
    assert line.endswith("(journal entry 10): TONGWEI +50000.00 CNY, 3 -0.01 CNY, DEV -1500.500 t LQS-FS-2023")
    many = adjustment_summary(11, [[a, 100] for a in range(SUMMARY_ITEMS + 3)], [], {})
    assert many.count(" CNY") == SUMMARY_ITEMS and many.endswith(" and 3 more")


def test_gtd_orders_expire_through_a_journaled_command(db, run):
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, _dev, buy = await _listed(db, clock=clock)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 100_000, "ref": "bank-1"})
            gtd = await svc.submit({**place(buy, E.BID, 3400, 2000), "tif": E.GTD, "expire_ts": clock.ts + 60_000_000})
            assert svc.core.cash[buy][1] > 0
            clock.ts += 61_000_000
            later = await svc.submit({"op": "deposit", "account": buy, "amount": 1, "ref": "bank-2"})
            rows = await _journal_rows(db)
            expire_row = rows[-2]
            assert orjson.loads(expire_row["command"]) == {"op": "expire"}
            assert [e[:3] for e in orjson.loads(expire_row["events"])] == [
                [E.EV_EXPIRED, SYMBOL, gtd.order_id], [E.EV_LEVEL, SYMBOL, E.BID]]
            assert later.seq == expire_row["seq"] + 1
            assert svc.core.cash[buy] == [100_001, 0]
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_day_that_closes_with_a_gtd_order_due_journals_the_expiry_then_the_close(db, run):
    """The first command of a new trading day may find both a GTD order due and the last day to
    close: the expiry is journaled, then the close (whose price the expiry cannot change), then the
    command. (The close first was refused by the core while the expiry was due, and the refusal
    went into the journal as an entry without a sequence number: the write failed and the service
    stopped.)"""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, clock=clock)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 100_000, "ref": "bank-1"})
            await svc.submit(place(dev, E.ASK, 3500, 1000))
            await svc.submit(place(buy, E.BID, 3500, 1000))  # a trade: the day will close
            gtd = await svc.submit({**place(buy, E.BID, 3400, 2000), "tif": E.GTD,
                                    "expire_ts": local_ts(2026, 11, 23, 20, 0)})
            clock.ts = local_ts(2026, 11, 24, 9, 30)
            later = await svc.submit({"op": "deposit", "account": buy, "amount": 1, "ref": "bank-2"})
            assert later.accepted, later
            rows = await _journal_rows(db)
            assert [orjson.loads(r["command"]).get("op") for r in rows[-3:]] == ["expire", "roll", "deposit"]
            assert orjson.loads(rows[-3]["events"])[0][:3] == [E.EV_EXPIRED, SYMBOL, gtd.order_id]
            assert svc.core.listings[SYMBOL].rules.reference_price == 3500
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_refused_retirement_gives_back_todays_purchase_still_locked(db, run):
    """A retirement takes the credits in the core before the registry moves them; when the
    registry refuses (here: an issuance of the vintage that the buyer holds none of), the
    give-back restores the position it took from: credits bought today stay locked (T+1), and a
    same-day resale is still refused. It freed them before."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 100_000, clock=clock)  # T+1 on by default
        try:
            await svc.submit(place(dev, E.ASK, 3500, 2000))
            await svc.submit(place(buy, E.BID, 3500, 2000))
            await svc.submit(place(dev, E.ASK, 3500, 1000))  # 1 t bought earlier: available
            await svc.submit(place(buy, E.BID, 3500, 1000))
            clock.ts = local_ts(2026, 11, 24, 10, 0)
            await svc.submit(place(dev, E.ASK, 3500, 2000))
            await svc.submit(place(buy, E.BID, 3500, 2000))  # 2 t bought today: locked
            await svc.caught_up(registry=True)
            other = await svc.issue(project="FOREST", vintage=2023, quantity_kg=5000)  # to DEV
            before = list(svc.core.credits[SYMBOL][buy])
            with pytest.raises(CarbonxError) as refused:
                await svc.retire(account="BUY", quantity_kg=4000, beneficiary="Expo", purpose="offset",
                                 issuance_id=other.id)
            assert refused.value.code == "insufficient_credits", refused.value
            assert svc.core.credits[SYMBOL][buy] == before
            assert (await svc.submit(place(buy, E.ASK, 3600, 4000))).code == "insufficient_credits"
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_an_unfreeze_on_the_day_of_the_freeze_keeps_todays_purchase_locked(db, run):
    """The operator freezes 4 t of a member's range holding 2 t bought yesterday and 2 t of 3 t
    bought today, and unfreezes it the same day: today's purchase stays unsellable until
    tomorrow (T+1), yesterday's is sellable. The unfreeze used to give all 4 t back sellable."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 1_000_000, clock=clock)  # T+1
        try:
            await svc.submit(place(dev, E.ASK, 3500, 2000))
            await svc.submit(place(buy, E.BID, 3500, 2000))  # Monday
            clock.ts = local_ts(2026, 11, 24, 10, 0)
            await svc.submit(place(dev, E.ASK, 3500, 3000))
            await svc.submit(place(buy, E.BID, 3500, 3000))  # Tuesday: locked
            await svc.caught_up(registry=True)
            held = await svc.pool.fetchrow(
                "SELECT p.scheme, p.code, i.vintage, min(lower(b.serials)) AS lo, "
                "sum(upper(b.serials) - lower(b.serials)) AS kg FROM blocks b JOIN issuances i ON i.id = b.issuance_id "
                "JOIN projects p ON p.id = i.project_id WHERE b.owner_account_id = $1 GROUP BY 1, 2, 3", buy)
            assert held["kg"] == 5000
            serial = format_serial(held["scheme"], held["code"], held["vintage"], held["lo"], held["lo"] + 4000)
            assert (await svc.freeze(serial=serial, reason="audit")).quantity == 4000
            assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, 1000)
            assert (await svc.unfreeze(serial=serial, reason="audit done")).quantity == 4000
            assert svc.core.position(SYMBOL, buy, clock.ts) == (2000, 0, 3000)
            assert (await svc.submit(place(buy, E.ASK, 3600, 3000))).code == "insufficient_credits"
            assert (await svc.submit(place(buy, E.ASK, 3600, 2000))).accepted
            assert await svc.reconcile() == []
            adjusts = [orjson.loads(r["command"]) for r in await _journal_rows(db)
                       if orjson.loads(r["command"])["op"] == "adjust"]
            assert [(a["credits"], a.get("frozen")) for a in adjusts] == [
                ([[SYMBOL, buy, -4000]], True), ([[SYMBOL, buy, 4000]], True)]
        finally:
            await svc.stop()

    run(main())


def test_a_cancel_of_frozen_credits_caps_what_a_later_unfreeze_relocks(db, run):
    """BUY's 3 t bought today are frozen, then cancelled for good; later that day it receives 2 t
    by issuance, which the operator freezes and unfreezes: they come back sellable. The core used
    to remember the 3 t and relock 2 t never bought that day (review28)."""
    async def main():
        svc, buy, clock, serial = await _bought_today(db, 3000)
        try:
            assert (await svc.freeze(serial=serial, reason="suspect delivery")).quantity == 3000
            assert svc.core.frozen_locked == {(SYMBOL, buy): [trading_day(clock.ts), 3000]}
            assert (await svc.cancel_serials(serial=serial, reason="invalidated")).quantity == 3000
            assert svc.core.frozen_locked == {}
            await svc.issue(project="FOREST", vintage=2023, quantity_kg=2000, to_account="BUY", reference="VR-2")
            serial = await _held_range(svc, buy, 2000)
            await svc.freeze(serial=serial, reason="check")
            await svc.unfreeze(serial=serial, reason="check done")
            assert svc.core.position(SYMBOL, buy, clock.ts) == (2000, 0, 0)
            assert (await svc.submit(place(buy, E.ASK, 3600, 2000))).accepted
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_an_unfreeze_made_while_stopped_gives_todays_purchase_back_locked(db, run):
    """The operator freezes BUY's 3 t bought today with the exchange running, stops it, and
    unfreezes them from the command line (or the exchange died between an unfreeze and its
    give-back). The next start, the same day, finds fewer kg frozen than the core remembers and
    gives the 3 t back locked (T+1); the comparison with the registry gave them back sellable."""
    async def main():
        svc, buy, clock, serial = await _bought_today(db, 3000)
        assert (await svc.freeze(serial=serial, reason="audit")).quantity == 3000
        svc = await _changed_while_stopped(db, svc, clock,
                                           lambda conn: registry.unfreeze(conn, serial=serial, reason="audit done"))
        try:
            assert svc.core.frozen_locked == {}
            await _locked_until_the_next_day(svc, buy, clock, 3000)
        finally:
            await svc.stop()

    run(main())


def test_a_freeze_made_while_stopped_then_unfrozen_the_same_day_gives_todays_purchase_back_locked(db, run):
    """BUY's 3 t bought today are frozen from the command line while the exchange is stopped. The
    next start, the same day, takes them into the freeze: the operator's unfreeze later that day
    gives them back locked (T+1). The start took them unmarked, and the unfreeze made them
    sellable the day they were bought."""
    async def main():
        svc, buy, clock, serial = await _bought_today(db, 3000)
        svc = await _changed_while_stopped(db, svc, clock,
                                           lambda conn: registry.freeze(conn, serial=serial, reason="audit"))
        try:
            assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, 0)
            assert svc.core.frozen_locked == {(SYMBOL, buy): [trading_day(clock.ts), 3000]}
            assert (await svc.unfreeze(serial=serial, reason="audit done")).quantity == 3000
            await _locked_until_the_next_day(svc, buy, clock, 3000)
        finally:
            await svc.stop()

    run(main())


def test_a_retirement_made_while_stopped_is_not_remembered_as_frozen(db, run):
    """BUY retires 1 t of its 3 t bought today from the command line while the exchange is
    stopped; it has nothing frozen, so the start takes it as a plain outside change."""
    async def main():
        svc, buy, clock, _ = await _bought_today(db, 3000)
        svc = await _changed_while_stopped(db, svc, clock, lambda conn: registry.retire(
            conn, account="BUY", quantity_kg=1000, beneficiary="Expo", purpose="offset", symbol=SYMBOL), later_us=0)
        try:
            assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, 2000)
            assert svc.core.frozen_locked == {}
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_freeze_whose_change_was_not_made_gives_todays_purchase_back_locked_at_the_next_start(db, run, monkeypatch):
    """A freeze's take of BUY's 3 t bought today is journaled, then its registry change fails in a
    way that cannot be told apart from a commit (the credits stay taken: they may be frozen). The
    next start, the same day, finds no record that the change was made and gives the 3 t back
    locked, and forgets what the freeze took; the comparison with the registry made them sellable."""
    async def main():
        svc, buy, clock, serial = await _bought_today(db, 3000)
        freeze = registry.freeze

        async def lost(conn, dry_run=False, **kw):
            if dry_run:
                return await freeze(conn, dry_run=True, **kw)
            raise ConnectionResetError("the connection went")

        async def cannot_tell(xid, cause):
            return False

        monkeypatch.setattr(registry, "freeze", lost)
        monkeypatch.setattr(svc, "_rolled_back", cannot_tell)
        with pytest.raises(ConnectionResetError):
            await svc.freeze(serial=serial, reason="audit")
        monkeypatch.undo()
        taken = svc.core.seq  # the take (nothing was given back)
        assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, 0)
        assert list(svc.core.locked_takes.values()) == [[trading_day(clock.ts), True, [[SYMBOL, buy, 3000, 3000]]]]
        await svc.stop()
        svc = await _started(db, clock=clock)
        try:
            assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, 3000)
            assert svc.core.locked_takes == {} and svc.core.frozen_locked == {}
            back = [orjson.loads(r["command"]) for r in await _journal_rows(db) if r["seq"] > taken]
            assert [(c["op"], c.get("credits"), c.get("gives_back")) for c in back if c["op"] == "adjust"] == [
                ("adjust", [[SYMBOL, buy, 3000, 3000]], taken)]
            assert (await svc.submit(place(buy, E.ASK, 3600, 1000))).code == "insufficient_credits"
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


async def _bought_today(db: str, kg: int) -> tuple[ExchangeService, int, Clock, str]:
    """A service at a fixed clock on which BUY bought `kg` from DEV today (T+1: locked), settled:
    the service, BUY, the clock and the serial range BUY holds."""
    clock = Clock(local_ts(2026, 11, 24, 10, 0))
    svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 1_000_000, clock=clock)  # T+1
    await svc.submit(place(dev, E.ASK, 3500, kg))
    await svc.submit(place(buy, E.BID, 3500, kg))
    await svc.caught_up(registry=True)
    return svc, buy, clock, await _held_range(svc, buy, kg)


async def _held_range(svc: ExchangeService, account: int, kg: int) -> str:
    """The one contiguous range of `account`'s available credits, which must hold `kg`."""
    row = await svc.pool.fetchrow(
        "SELECT p.scheme, p.code, i.vintage, min(lower(b.serials)) AS lo, max(upper(b.serials)) AS hi, "
        "sum(upper(b.serials) - lower(b.serials)) AS kg FROM blocks b JOIN issuances i ON i.id = b.issuance_id "
        "JOIN projects p ON p.id = i.project_id WHERE b.owner_account_id = $1 AND b.state = 'available' "
        "GROUP BY 1, 2, 3", account)
    assert row["kg"] == kg and row["hi"] - row["lo"] == kg, row
    return format_serial(row["scheme"], row["code"], row["vintage"], row["lo"], row["hi"])


async def _locked_until_the_next_day(svc: ExchangeService, buy: int, clock: Clock, kg: int) -> None:
    """BUY's `kg` bought today (at _bought_today's clock) are all locked: not a tonne sells today,
    the registry and ledger agree with the core, and the next day all of them sell."""
    assert svc.core.position(SYMBOL, buy, clock.ts) == (0, 0, kg)
    assert (await svc.submit(place(buy, E.ASK, 3600, 1000))).code == "insufficient_credits"
    assert await svc.reconcile() == []
    clock.ts = local_ts(2026, 11, 25, 10, 0)  # the next day: sellable
    assert (await svc.submit(place(buy, E.ASK, 3600, kg))).accepted


async def _changed_while_stopped(db: str, svc: ExchangeService, clock: Clock, change: Callable,
                                 later_us: int = 3_600_000_000) -> ExchangeService:
    """Stop `svc`, make `change(conn)` in the registry as the command line would while the
    exchange is stopped, let `later_us` pass, and start it again."""
    await svc.stop()
    conn = await asyncpg.connect(db)
    try:
        await change(conn)
    finally:
        await conn.close()
    clock.ts += later_us
    return await _started(db, clock=clock)


def test_a_retirement_uses_todays_purchase_first(db, run):
    """Credits bought today cannot be sold today (T+1): a retirement takes them first and leaves
    the member's older, sellable credits. An offset (buy, then retire what it bought) on Tuesday
    used to retire Monday's tonnes in the core and leave Tuesday's locked, so Monday's could not
    be sold (review12)."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 1_000_000, clock=clock)  # T+1
        try:
            await svc.submit(place(dev, E.ASK, 3500, 5000))
            assert (await svc.submit(place(buy, E.BID, 3500, 5000))).accepted  # Monday: 5 t
            clock.ts = local_ts(2026, 11, 24, 10, 0)
            await svc.submit(place(dev, E.ASK, 3500, 3000))
            done = await offsetting.offset(svc, account="BUY", symbol=SYMBOL, quantity_kg=1000,
                                           max_cash_fen=10_000, beneficiary="Expo", purpose="one-day event")
            assert done.quantity_kg == 1000
            assert svc.core.position(SYMBOL, buy, clock.ts) == (5000, 0, 0)
            assert (await svc.submit(place(buy, E.BID, 3500, 2000))).accepted  # 2 t more today
            await svc.caught_up(registry=True)
            await svc.retire(account="BUY", quantity_kg=3000, beneficiary="Expo", purpose="offset", symbol=SYMBOL)
            assert svc.core.position(SYMBOL, buy, clock.ts) == (4000, 0, 0)  # 2 locked, then 1 of Monday's
            assert (await svc.submit(place(buy, E.ASK, 3600, 4000))).accepted
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_quiet_market_expires_gtd_orders_and_closes_the_day_on_time(db, run):
    """With no command arriving, a GTD order still expires when its time comes (its cash is
    free again, the journal has the expiry) and a trading day with trades closes at midnight
    (the reference price moves): the service's timer applies them."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 23, 59))
        svc, dev, buy = await _listed(db, clock=clock)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 100_000, "ref": "bank-1"})
            await svc.submit(place(dev, E.ASK, 3520, 1000))
            await svc.submit(place(buy, E.BID, 3520, 1000))
            gtd = await svc.submit({**place(buy, E.BID, 3400, 2000), "tif": E.GTD,
                                    "expire_ts": clock.ts + 20_000_000})
            assert svc.core.cash[buy][1] > 0
            clock.ts += 21_000_000  # past the expiry; nobody sends anything
            for _ in range(60):
                if gtd.order_id not in svc.core.orders:
                    break
                await asyncio.sleep(0.05)
            assert gtd.order_id not in svc.core.orders and svc.core.cash[buy][1] == 0
            clock.ts = local_ts(2026, 11, 24, 0, 0)  # midnight in Shanghai: the day closes
            for _ in range(60):
                if svc.core.listings[SYMBOL].rules.reference_price == 3520:
                    break
                await asyncio.sleep(0.05)
            assert svc.core.listings[SYMBOL].rules.reference_price == 3520
            await svc.settle()
            ops = [orjson.loads(r["command"]).get("op") for r in await _journal_rows(db)]
            assert ops[-2:] == ["expire", "roll"], ops
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_freeze_right_after_a_cancel_freezes_what_the_registry_then_holds(db, run):
    """A sell order encumbers serials; its cancel is journaled but not yet settled when the
    operator freezes the whole issuance. The freeze reads the range once the registry has caught
    up: it freezes all 100 t, in the registry and the core alike (it took 90 t in the core and
    froze 100 in the registry, and the seller then sold 10 t the registry no longer had: the
    projector failed and the exchange stopped, also after a restart)."""
    async def main():
        conn = await asyncpg.connect(db)
        iss = await world(conn)
        await conn.close()
        svc = await _started(db)
        try:
            await svc.list_instrument(SYMBOL, LISTING)
            dev = await svc.account("DEV")
            sell = await svc.submit(place(dev, E.ASK, 3500, 10_000))
            await svc.caught_up(registry=True)
            assert (await svc.submit({"op": "cancel", "account": dev, "order_id": sell.order_id})).accepted
            frozen = await svc.freeze(serial=iss.serial, reason="investigation")
            assert frozen.quantity == 100_000 and svc.core.credits[SYMBOL][dev][P_AVAILABLE] == 0
            assert (await svc.submit(place(dev, E.ASK, 3500, 10_000))).code == "insufficient_credits"
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_range_that_changes_under_a_freeze_is_refused_and_changes_nothing(db, run, monkeypatch):
    """Should the registry move other credits than the core was told (an order settled in the
    range between the take and the change), the change is refused as busy: the registry rolls
    back, the core gets its credits back, and both still agree."""
    async def main():
        conn = await asyncpg.connect(db)
        iss = await world(conn)
        await conn.close()
        svc = await _started(db)
        try:
            await svc.list_instrument(SYMBOL, LISTING)
            dev, buy = await svc.account("DEV"), await svc.account("BUY")
            freeze = registry.freeze

            async def settled_meanwhile(conn: asyncpg.Connection, dry_run: bool = False,
                                        **kw) -> registry.MovementResult:
                # as if a delivery to BUY had been settled in the range after the check and the take
                if not dry_run:
                    await registry.apply_movements(conn, [registry.ByQuantity(
                        (iss.id,), dev, "available", buy, "available", 1000, "trade", "trade:meanwhile")])
                return await freeze(conn, dry_run=dry_run, **kw)

            monkeypatch.setattr(registry, "freeze", settled_meanwhile)
            before = list(svc.core.credits[SYMBOL][dev])
            with pytest.raises(CarbonxError) as refused:
                await svc.freeze(serial=iss.serial, reason="investigation")
            assert refused.value.code == "busy", refused.value
            assert svc.core.credits[SYMBOL][dev] == before
            async with svc.pool.acquire() as c:
                assert await c.fetchval("SELECT count(*) FROM blocks WHERE state <> 'available'") == 0
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_sell_left_outside_the_new_band_is_cancelled_at_the_close_and_its_credits_released(db, run):
    """The day closes at 32.00 (band 28.80-35.20): DEV's sell resting at 38.00 is cancelled by the
    close (reason price_band), and its credits are available again in the core and the registry."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True, "reference_price": 3500}}, 100_000,
                                      clock=clock)
        try:
            high = await svc.submit(place(dev, E.ASK, 3800, 5000))
            await svc.submit(place(dev, E.ASK, 3200, 1000))
            await svc.submit(place(buy, E.BID, 3200, 1000))
            clock.ts = local_ts(2026, 11, 24, 9, 30)
            await svc.submit({"op": "deposit", "account": buy, "amount": 1, "ref": "bank-2"})
            assert high.order_id not in svc.core.orders
            assert svc.core.credits[SYMBOL][dev][P_AVAILABLE] == 99_000
            await svc.caught_up(registry=True, orders=True)
            assert svc.orders.get(high.order_id).reason == "price_band"
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_snapshot_written_by_an_earlier_version_still_starts_the_exchange(db, run):
    """Snapshots are checked against the digest their writer computed, over their own layout: a
    snapshot from before client order ids kept every term (six fields) and before self-trade
    settings were kept restores, and the exchange starts and answers resends from it. (Checked
    against this version's re-serialisation, such a sound snapshot stopped every start.)"""
    async def main():
        svc, _dev, buy = await _listed(db)
        try:
            await svc.submit({"op": "deposit", "account": buy, "amount": 100_000, "ref": "bank-1"})
            first = await svc.submit({**place(buy, E.BID, 3400, 1000), "coid": "kept"})
        finally:
            await svc.stop()  # writes a snapshot
        conn = await asyncpg.connect(db)
        try:
            seq, data = await conn.fetchrow("SELECT seq, state FROM snapshots ORDER BY seq DESC LIMIT 1")
            state = orjson.loads(data)
            del state["stp"]
            state["coids"] = [row[:8] for row in state["coids"]]  # account, coid, the six old fields
            old = orjson.dumps(state)
            books = {s: ExchangeCore.restore(data).engine.book(s).state_digest() for s, _ in state["books"]}
            digest = hashlib.sha256(orjson.dumps({**state, "books": [[s, books[s]] for s, _ in state["books"]]}))
            await conn.execute("UPDATE snapshots SET state = $2, state_digest = $3 WHERE seq = $1", seq, old,
                               digest.hexdigest())
        finally:
            await conn.close()
        svc = await _started(db)
        try:
            again = await svc.submit({**place(buy, E.BID, 3400, 1000), "coid": "kept"})
            assert again.duplicate and again.order_id == first.order_id
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_start_after_a_gtd_sell_expired_while_stopped_is_clean(db, run):
    """The exchange was stopped over a GTD sell's expiry. At the next start the timer must not
    expire it while the start-up compares the core with the registry: the core would have
    released the credits and the registry not yet, and the start refused (registry_mismatch)."""
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, _buy = await _listed(db, clock=clock)
        assert (await svc.submit({**place(dev, E.ASK, 3500, 5000), "tif": E.GTD,
                                  "expire_ts": clock.ts + 60_000_000})).accepted
        await svc.stop()
        clock.ts += 120_000_000
        again = await _started(db, clock=clock)
        try:
            await again.submit({"op": "deposit", "account": dev, "amount": 1, "ref": "after"})
            assert [orjson.loads(r["command"])["op"] for r in await _journal_rows(db)][-2:] == ["expire", "deposit"]
            assert await again.reconcile() == []
        finally:
            await again.stop()

    run(main())


def test_a_give_back_after_an_expiry_journaled_with_the_take_relocks_only_what_was_locked(db, run, monkeypatch):
    """BUY holds 1 t bought yesterday in a GTD sell that falls due now, and 2 t bought today
    (locked). A retirement of 1 t is refused: its take came from the 1 t the due expiry freed
    (journaled just before the take), so the give-back returns it available, not locked."""
    monkeypatch.setattr(service_module, "TIMER_MAX", 3600.0)  # the take's own housekeeping, not the timer's
    retire = registry.retire

    async def refused_after_the_check(conn: asyncpg.Connection, dry_run: bool = False, **kw):
        # The registry's check before the take refuses a retirement from an issuance the member
        # holds none of, journaling nothing; here it is refused only after the take, as when
        # the credits moved in between, so that the give-back runs.
        return None if dry_run else await retire(conn, **kw)

    monkeypatch.setattr(registry, "retire", refused_after_the_check)

    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 100_000, clock=clock)
        try:
            await svc.submit(place(dev, E.ASK, 3500, 1000))
            await svc.submit(place(buy, E.BID, 3500, 1000))
            clock.ts = local_ts(2026, 11, 24, 10, 0)
            assert (await svc.submit({**place(buy, E.ASK, 3800, 1000), "tif": E.GTD,
                                      "expire_ts": clock.ts + 60_000_000})).accepted
            await svc.submit(place(dev, E.ASK, 3500, 2000))
            await svc.submit(place(buy, E.BID, 3500, 2000))  # 2 t today: locked
            await svc.caught_up(registry=True)
            other = await svc.issue(project="FOREST", vintage=2023, quantity_kg=5000)  # to DEV
            clock.ts += 61_000_000  # the GTD sell is due
            with pytest.raises(CarbonxError) as refused:
                await svc.retire(account="BUY", quantity_kg=1000, beneficiary="Expo", purpose="offset",
                                 issuance_id=other.id)
            assert refused.value.code == "insufficient_credits"
            assert svc.core.credits[SYMBOL][buy][:3] == [1000, 0, 2000]
            assert (await svc.submit(place(buy, E.ASK, 3600, 1000))).accepted
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_sell_accepted_during_the_registry_check_is_not_taken_from(db, run, monkeypatch):
    """A retirement of all DEV holds looks at the core, then waits for the registry's dry run; a
    sell of DEV's accepted meanwhile encumbers 10 t. The take is checked again with nothing
    awaited before it: the retirement is refused and journals nothing, where the core used to
    take the 100 t anyway (its adjust takes what it is told) and be left at -10 t (review22)."""
    async def main():
        svc, dev = await _dev_listed(db)
        try:
            retire, sells = registry.retire, []

            async def sell_meanwhile(conn: asyncpg.Connection, dry_run: bool = False, **kw):
                out = await retire(conn, dry_run=dry_run, **kw)
                if dry_run:
                    sells.append(await svc.submit(place(dev, E.ASK, 5000, 10_000)))
                return out

            monkeypatch.setattr(registry, "retire", sell_meanwhile)
            seq = svc.core.seq
            with pytest.raises(CarbonxError) as refused:
                await svc.retire(account="DEV", quantity_kg=100_000, beneficiary="Expo", purpose="offset",
                                 symbol=SYMBOL)
            assert refused.value.code == "insufficient_credits"
            assert [s.accepted for s in sells] == [True]
            assert svc.core.seq == seq + 1  # the sell, and nothing for the refused retirement
            assert svc.core.credits[SYMBOL][dev][:3] == [90_000, 10_000, 0]
            assert svc.core.check_invariants() == [] and await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_registry_change_runs_to_its_end_when_its_caller_is_cancelled(db, run, monkeypatch):
    """A client gone, a server's graceful-shutdown timeout, a wait_for: the caller of a retirement
    is cancelled after the take. The retirement still ends (made, here), and the core and the
    registry agree; half-way, a cancel once left the take without change or give-back, and one
    after the registry's commit gave the credits back (review23)."""
    async def main():
        svc, dev = await _dev_listed(db)
        try:
            caught_up, callers = svc.caught_up, []

            async def cancel_the_caller(seq=None, **kw):
                if seq is not None:  # the wait after the take
                    callers[0].cancel()
                return await caught_up(seq, **kw)

            monkeypatch.setattr(svc, "caught_up", cancel_the_caller)
            callers.append(asyncio.ensure_future(svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo",
                                                            purpose="offset", symbol=SYMBOL)))
            with pytest.raises(asyncio.CancelledError):
                await callers[0]
            monkeypatch.undo()
            while svc._changes:
                await asyncio.sleep(0.01)
            assert svc.core.credits[SYMBOL][dev][:3] == [90_000, 0, 0]
            assert await svc.pool.fetchval("SELECT sum(quantity_kg) FROM retirements") == 10_000
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_stop_lets_a_registry_change_under_way_end(db, run, monkeypatch):
    """stop() the moment a retirement's take is journaled: the retirement ends first, with the
    consumers still running (it used to wait 30 s for a projector that had stopped, and fail,
    and the next start journaled the take back as a change made outside the service)."""
    async def main():
        svc, dev = await _dev_listed(db)
        apply, stopping = svc.apply, []

        def stop_after_the_take(command):
            out = apply(command)
            if command.get("cause") == "retirement" and not stopping:
                stopping.append(asyncio.ensure_future(svc.stop()))
            return out

        monkeypatch.setattr(svc, "apply", stop_after_the_take)
        began = time.monotonic()
        ret = await svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo", purpose="offset",
                               symbol=SYMBOL)
        await stopping[0]
        assert time.monotonic() - began < 10 and ret.quantity_kg == 10_000
        again = await _started(db)
        try:
            last = await again.pool.fetchval("SELECT command FROM journal ORDER BY seq DESC LIMIT 1")
            assert orjson.loads(last)["cause"] == "retirement", last  # no adjust at the start
            assert again.core.credits[SYMBOL][dev][:3] == [90_000, 0, 0] and await again.reconcile() == []
        finally:
            await again.stop()

    run(main())


def test_credits_taken_for_a_change_the_registry_was_never_asked_for_are_given_back(db, run, monkeypatch):
    """The projector does not catch up with the take in time: the retirement fails unavailable
    and the credits go back (they stayed taken, the registry still holding them, until a restart)."""
    async def main():
        svc, dev = await _dev_listed(db)
        try:
            caught_up = svc.caught_up

            async def slow_projector(seq=None, **kw):
                if seq is not None:
                    raise CarbonxError("unavailable", "the registry did not catch up with the exchange in time")
                return await caught_up(seq, **kw)

            monkeypatch.setattr(svc, "caught_up", slow_projector)
            with pytest.raises(CarbonxError) as failed:
                await svc.retire(account="DEV", quantity_kg=10_000, beneficiary="Expo", purpose="offset",
                                 symbol=SYMBOL)
            monkeypatch.undo()
            assert failed.value.code == "unavailable"
            assert svc.core.credits[SYMBOL][dev][:3] == [100_000, 0, 0] and await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


@pytest.mark.parametrize("consumers", ["task", "process"])
def test_a_sell_accepted_after_a_freezes_take_does_not_encumber_the_range(db, run, monkeypatch, consumers):
    """The operator freezes DEV's lowest 10 t; DEV offers its other 90 t after the take. The
    projector stays at the take until the freeze is made, so the sell's encumbrance falls on the
    other serials: the freeze used to be refused (credits_encumbered on its own range, review23).
    The network server runs the consumers in a process of their own, told how far to go."""
    async def main():
        svc, dev = await _dev_listed(db, consumers=consumers)
        try:
            iss = await svc.pool.fetchrow("SELECT p.scheme, p.code, i.vintage, lower(i.serials) AS lo "
                                          "FROM issuances i JOIN projects p ON p.id = i.project_id")
            lowest = format_serial(iss["scheme"], iss["code"], iss["vintage"], iss["lo"], iss["lo"] + 10_000)
            freeze, sells = registry.freeze, []

            async def sell_meanwhile(conn: asyncpg.Connection, dry_run: bool = False, **kw):
                if not dry_run and not sells:
                    sells.append(await svc.submit(place(dev, E.ASK, 5000, 90_000)))
                    await asyncio.sleep(0.2)  # time enough for a projector that were not held
                return await freeze(conn, dry_run=dry_run, **kw)

            monkeypatch.setattr(registry, "freeze", sell_meanwhile)
            assert (await svc.freeze(serial=lowest, reason="audit")).quantity == 10_000
            monkeypatch.undo()
            assert sells[0].accepted
            await svc.caught_up(registry=True)
            states = await svc.pool.fetch("SELECT state, sum(upper(serials) - lower(serials)) AS kg FROM blocks "
                                          "WHERE lower(serials) < $1 GROUP BY 1", iss["lo"] + 10_000)
            assert {r["state"]: r["kg"] for r in states} == {"frozen": 10_000}
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_a_repeat_of_a_deposit_made_before_the_member_rule_is_answered_with_it(db, run):
    """Deposits into an operator's account are refused now; one the service journaled before the
    rule is still a payment, and its repeat is answered with it (a duplicate), as every repeat is."""
    async def main():
        svc = await _world_started(db)
        try:
            ops = await svc.account("OPS")
            old = {"op": "deposit", "account": ops, "amount": 1000, "ref": "old-ops-1"}
            out, durable = svc.apply(dict(old))  # journaled as the service did before the rule
            await durable
            assert out.accepted
            again = await svc.submit(dict(old))
            assert again.duplicate and again.code is None
            with pytest.raises(CarbonxError) as refused:
                await svc.submit({**old, "ref": "new-ops-1"})
            assert refused.value.code == "invalid_request"
        finally:
            await svc.stop()

    run(main())


def test_reconcile_is_not_raced_by_the_timer(db, run):
    """On a quiet exchange GTD orders expire on the timer while reconcile runs again and again:
    reconcile holds the timer, so it never sets a core an entry ahead against a registry an
    entry behind (it reported such phantom differences about once in 150 runs, review11)."""
    async def main():
        svc, dev, buy = await _listed(db, funds=10_000_000)
        phantoms = []
        try:
            for _ in range(25):
                for k in range(5):
                    await svc.submit({**place(dev, E.ASK, 3500 + k, 1000), "tif": E.GTD,
                                      "expire_ts": service_module.now_us() + 15_000 * (k + 1)})
                    await svc.submit({**place(buy, E.BID, 3400 - k, 1000), "tif": E.GTD,
                                      "expire_ts": service_module.now_us() + 13_000 * (k + 1)})
                end = time.monotonic() + 0.08
                while time.monotonic() < end:
                    if problems := await svc.reconcile():
                        phantoms.append(problems)
        finally:
            await svc.stop()
        assert phantoms == []

    run(main())


def test_a_failed_journal_write_stops_the_service_and_loses_nothing_acknowledged(db, run):
    async def main():
        svc, _dev, buy = await _listed(db)
        acked = await svc.submit({"op": "deposit", "account": buy, "amount": 1_000, "ref": "bank-1"})
        killer = await asyncpg.connect(db)
        # Kill the journal writer's connection: it is the one holding the service's advisory lock.
        killed = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 "
            "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            SERVICE_LOCK_KEY)
        assert killed == 1
        with pytest.raises(CarbonxError) as err:
            await svc.submit({"op": "deposit", "account": buy, "amount": 5, "ref": "bank-2"})
        assert err.value.code == "unavailable"
        with pytest.raises(CarbonxError):
            await svc.submit({"op": "deposit", "account": buy, "amount": 5, "ref": "bank-3"})
        await svc.stop()
        await killer.close()
        again = await _started(db)
        try:
            assert again.core.seq == acked.seq
            assert again.core.cash[buy][0] == 1_000
            assert await again.reconcile() == []
        finally:
            await again.stop()

    run(main())


def test_same_day_resale_is_refused_and_allowed_the_next_day(db, run):
    async def main():
        clock = Clock(local_ts(2026, 11, 23, 10, 0))
        svc, dev, buy = await _listed(db, {"rules": {"always_open": True}}, 100_000, clock=clock)  # T+1 on by default
        try:
            await svc.submit(place(dev, E.ASK, 3500, 1000))
            await svc.submit(place(buy, E.BID, 3500, 1000))
            assert (await svc.submit(place(buy, E.ASK, 3600, 1000))).code == "insufficient_credits"
            clock.ts = local_ts(2026, 11, 24, 9, 30)
            assert (await svc.submit(place(buy, E.ASK, 3600, 1000))).accepted
            assert await svc.reconcile() == []
        finally:
            await svc.stop()

    run(main())


def test_reconcile_beside_orders_retirements_and_issuances_finds_nothing(db, run):
    """A registry change through the service is two steps (the registry, and an adjust in the
    journal); the service's reconcile and `carbonx reconcile` beside it reported the gap between
    them as a difference, and the service's compared a live core that orders had moved past the
    registry (review12: 60-100 false reports a run). Now both read between changes, at one seq."""
    from exchange.reconcile import reconcile as reconcile_database

    async def main():
        svc, dev, _ = await _listed(db)
        conn = await asyncpg.connect(db)
        found: list = []
        runs = 0
        try:
            done = asyncio.Event()

            async def orders():
                for i in range(150):
                    await svc.submit(place(dev, E.ASK, 3500 + i % 40, 200))  # 30 t of DEV's 100
                    await asyncio.sleep(0.001)

            async def changes():
                for i in range(12):
                    await svc.retire(account="DEV", quantity_kg=1000, beneficiary="Expo", purpose="offset",
                                     symbol=SYMBOL)
                    await svc.issue(project="FOREST", vintage=2023, quantity_kg=1000, reference=f"v-{i}")

            async def checks():
                nonlocal runs
                while not done.is_set():
                    problems = await svc.reconcile()
                    r = await reconcile_database(conn)
                    found.extend(problems + [c.detail for c in r.checks if not c.ok])
                    runs += 1

            checker = asyncio.create_task(checks())
            await asyncio.gather(orders(), changes())
            done.set()
            await checker
        finally:
            await conn.close()
            await svc.stop()
        assert runs >= 5, runs
        assert found == [], found[:5]

    run(main())


def test_a_stop_while_a_commit_gathers_commands_finishes(db, run):
    """stop() woke the journal writer while it slept to let a commit gather more commands; the
    writer then cleared that wake-up with the batch and waited for the next one for ever, and
    stop() with it (review14)."""
    async def main():
        svc, dev, _ = await _listed(db, flush_interval=0.2)
        out, durable = svc.apply(place(dev, E.ASK, 3500, 1000))
        await asyncio.sleep(0.05)  # the writer is in its gathering sleep
        await asyncio.wait_for(svc.stop(), 10)
        await durable
        assert out.accepted and svc.durable_seq == out.seq

    run(main())


def test_a_failure_while_a_commit_gathers_commands_is_not_a_second_failure(db, run, caplog):
    """A failure elsewhere (a consumer's) while the journal writer slept to gather a commit emptied
    its batch; the writer then failed on the empty batch and logged a journal failure of its own."""
    async def main():
        svc, dev, _ = await _listed(db, flush_interval=0.2)
        try:
            _, durable = svc.apply(place(dev, E.ASK, 3500, 1000))
            await asyncio.sleep(0.05)
            svc._fail(RuntimeError("the consumers process ended"), None)
            with pytest.raises(CarbonxError):
                await durable
            await asyncio.sleep(0.3)
        finally:
            await asyncio.wait_for(svc.stop(), 10)

    run(main())
    assert "journal writer failed" not in caplog.text, caplog.text


def test_the_database_names_each_connection_by_its_job(db, run):
    """pg_stat_activity says which backend serves what (the bench splits the database's CPU so)."""
    async def body() -> set[str]:
        svc = await _started(db)
        try:
            await svc.pool.fetchval("SELECT 1")
            return {r["application_name"] for r in await svc.pool.fetch(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")}
        finally:
            await svc.stop()
    assert {"carbonx journal", "carbonx projector", "carbonx history", "carbonx reads"} <= run(body())


def test_an_application_name_in_the_url_stays_the_prefix(db, run):
    """An operator who names the exchange in DATABASE_URL still finds every one of its sessions by
    that name (the crash test waits for a killed process's sessions to end so)."""
    dsn = db + ("&" if "?" in db else "?") + "application_name=billing-east"

    async def body() -> set[str]:
        svc = await _started(dsn)
        try:
            await svc.pool.fetchval("SELECT 1")
            return {r["application_name"] for r in await svc.pool.fetch(
                """SELECT application_name FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()""")}
        finally:
            await svc.stop()
    names = run(body())
    assert {"billing-east journal", "billing-east projector", "billing-east history"} <= names, names
    assert not {n for n in names if n.startswith("carbonx")}, names
