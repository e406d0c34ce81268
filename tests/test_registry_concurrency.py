"""Two transactions moving the same credits on real connections: exactly one succeeds."""

import asyncio

import asyncpg
import pytest

from exchange import ledger, registry
from exchange.accounts import create_account
from exchange.errors import CarbonxError
from tests.registry_helpers import cover_violations, world


def test_second_transfer_waits_for_the_first_and_fails_cleanly(db, run):
    async def body():
        a, b = await asyncpg.connect(db), await asyncpg.connect(db)
        try:
            await world(a, tonnes=10)
            await create_account(a, "OTHER", "Other", "enterprise")
            tx = a.transaction()
            await tx.start()
            await registry.transfer(a, from_account="DEV", to_account="BUY", quantity_kg=10_000, symbol="FOREST-2023",
                                    cause_ref="first")
            second = asyncio.create_task(registry.transfer(
                b, from_account="DEV", to_account="OTHER", quantity_kg=10_000, symbol="FOREST-2023",
                cause_ref="second"))
            await asyncio.sleep(0.3)
            assert not second.done(), "the second transfer must wait for the first one's lock"
            await tx.commit()
            with pytest.raises(CarbonxError) as e:
                await second
            assert e.value.code == "insufficient_credits"
            holders = await a.fetch("SELECT a.code, b.state FROM blocks b JOIN accounts a ON a.id = owner_account_id")
            assert [tuple(h) for h in holders] == [("BUY", "available")]
        finally:
            await a.close()
            await b.close()

    run(body())


def test_racing_transfers_of_the_same_credits(db, run):
    async def body():
        setup = await asyncpg.connect(db)
        await world(setup, tonnes=15)
        names = [f"R{i}" for i in range(8)]
        for n in names:
            await create_account(setup, n, n, "enterprise")
        conns = [await asyncpg.connect(db) for _ in names]
        try:
            for round_ in range(6):
                # DEV holds 15 t; eight racers each ask for 10 t at once: exactly one can have it.
                async def grab(c, n, round_=round_):
                    try:
                        await registry.transfer(c, from_account="DEV", to_account=n, quantity_kg=10_000,
                                                symbol="FOREST-2023", cause_ref=f"{n}-{round_}")
                        return n
                    except CarbonxError as e:
                        assert e.code == "insufficient_credits"
                        return None

                results = await asyncio.gather(*(grab(c, n) for c, n in zip(conns, names, strict=True)))
                winners = [w for w in results if w]
                assert len(winners) == 1, winners
                assert not await cover_violations(setup)
                held = await setup.fetchval(
                    "SELECT sum(upper(serials) - lower(serials))::bigint FROM blocks b "
                    "JOIN accounts a ON a.id = owner_account_id WHERE a.code = $1", winners[0])
                assert held == 10_000
                # Give back a part first, then the rest, so blocks split and merge between rounds.
                await registry.transfer(setup, from_account=winners[0], to_account="DEV", quantity_kg=3_333,
                                        symbol="FOREST-2023", cause_ref=f"back1-{round_}")
                await registry.transfer(setup, from_account=winners[0], to_account="DEV", quantity_kg=6_667,
                                        symbol="FOREST-2023", cause_ref=f"back2-{round_}")
            # Everything is back with DEV in one merged block.
            rows = await setup.fetch("SELECT serials FROM blocks")
            assert len(rows) == 1
        finally:
            for c in conns:
                await c.close()
            await setup.close()

    run(body())


def test_racing_withdrawals_cannot_overdraw(db, run):
    async def body():
        setup = await asyncpg.connect(db)
        await world(setup)
        await ledger.deposit(setup, account="BUY", amount_fen=1000, reference="d")
        conns = [await asyncpg.connect(db) for _ in range(6)]
        try:
            async def take(c, i):
                try:
                    await ledger.withdraw(c, account="BUY", amount_fen=400, reference=f"w{i}")
                    return True
                except CarbonxError as e:
                    assert e.code == "insufficient_funds"
                    return False

            results = await asyncio.gather(*(take(c, i) for i, c in enumerate(conns)))
            assert sum(results) == 2
            assert await ledger.balance(setup, "BUY") == 200
            assert await ledger.ledger_total(setup) == 0
        finally:
            for c in conns:
                await c.close()
            await setup.close()

    run(body())
