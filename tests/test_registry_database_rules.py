"""The registry's invariants hold even against raw SQL: the database refuses what code must never do."""

import asyncpg
import pytest

from exchange import registry
from tests.registry_helpers import world


async def _dev_id(conn):
    return await conn.fetchval("SELECT id FROM accounts WHERE code = 'DEV'")


def test_overlapping_block_refused_by_raw_sql(conn, run):
    async def body():
        iss = await world(conn)
        dev = await _dev_id(conn)
        with pytest.raises(asyncpg.ExclusionViolationError):
            await conn.execute(
                "INSERT INTO blocks (issuance_id, serials, owner_account_id, state) "
                "VALUES ($1, int8range(50, 60), $2, 'available')", iss.id, dev)
        # Even inside a transaction that defers the exclusion check, commit refuses it.
        with pytest.raises(asyncpg.ExclusionViolationError):
            async with conn.transaction():
                await conn.execute("SET CONSTRAINTS blocks_no_overlap DEFERRED")
                await conn.execute(
                    "INSERT INTO blocks (issuance_id, serials, owner_account_id, state) "
                    "VALUES ($1, int8range(1, 2), $2, 'available')", iss.id, dev)
        assert await conn.fetchval("SELECT count(*) FROM blocks") == 1

    run(body())


def test_uncovering_an_issuance_is_refused_at_commit(conn, run):
    async def body():
        iss = await world(conn)
        dev = await _dev_id(conn)
        # Deleting the only block leaves issued serials held by nobody.
        with pytest.raises(asyncpg.CheckViolationError, match="cover"):
            async with conn.transaction():
                await conn.execute("DELETE FROM blocks WHERE issuance_id = $1", iss.id)
        # Shrinking a block leaves a hole.
        with pytest.raises(asyncpg.CheckViolationError, match="cover"):
            async with conn.transaction():
                await conn.execute("UPDATE blocks SET serials = int8range(1, 50) WHERE issuance_id = $1", iss.id)
        # A block past the issued range is refused even if the sum matches.
        with pytest.raises(asyncpg.CheckViolationError, match="cover"):
            async with conn.transaction():
                await conn.execute("UPDATE blocks SET serials = int8range(1, 100000) WHERE issuance_id = $1", iss.id)
                await conn.execute(
                    "INSERT INTO blocks (issuance_id, serials, owner_account_id, state) "
                    "VALUES ($1, int8range(100001, 100002), $2, 'available')", iss.id, dev)
        # An issuance with no blocks at all is refused.
        with pytest.raises(asyncpg.CheckViolationError, match="cover"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO issuances (project_id, vintage, serials, issued_to_account_id) "
                    "VALUES ($1, 2024, int8range(1, 10), $2)", iss.project_id, dev)
        # A correct split in two statements is fine: the check runs at commit.
        async with conn.transaction():
            await conn.execute("UPDATE blocks SET serials = int8range(1, 50) WHERE issuance_id = $1", iss.id)
            await conn.execute(
                "INSERT INTO blocks (issuance_id, serials, owner_account_id, state) "
                "VALUES ($1, int8range(50, 100001), $2, 'frozen')", iss.id, dev)
        assert await conn.fetchval("SELECT count(*) FROM blocks") == 2

    run(body())


def test_cover_is_rechecked_after_set_constraints_immediate(conn, run):
    async def body():
        iss = await world(conn)
        with pytest.raises(asyncpg.CheckViolationError, match="cover"):
            async with conn.transaction():
                await conn.execute("UPDATE blocks SET state = 'frozen' WHERE issuance_id = $1", iss.id)
                await conn.execute("SET CONSTRAINTS blocks_cover IMMEDIATE")  # checks and passes here
                await conn.execute("SET CONSTRAINTS blocks_cover DEFERRED")
                await conn.execute("DELETE FROM blocks WHERE issuance_id = $1", iss.id)  # must be caught at commit

    run(body())


def test_empty_and_negative_ranges_refused(conn, run):
    async def body():
        iss = await world(conn)
        dev = await _dev_id(conn)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO blocks (issuance_id, serials, owner_account_id, state) "
                "VALUES ($1, int8range(5, 5), $2, 'available')", iss.id, dev)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO retirements (account_id, quantity_kg, beneficiary, purpose, certificate_code) "
                "VALUES ($1, 0, 'x', 'y', 'CODE')", dev)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, to_state,"
                " cause, cause_ref) VALUES ($1, int8range(1, 2), $2, 'available', $2, 'frozen', 'freeze', ' ')",
                iss.id, dev)

    run(body())


def test_retired_blocks_never_change_and_history_is_append_only(conn, run):
    async def body():
        await world(conn)
        await registry.transfer(conn, from_account="DEV", to_account="BUY", quantity_kg=5000,
                                symbol="FOREST-2023", cause_ref="t1")
        ret = await registry.retire(conn, account="BUY", quantity_kg=2000, beneficiary="B", purpose="P",
                                    symbol="FOREST-2023")
        for sql in ("UPDATE blocks SET state = 'available', retirement_id = NULL WHERE state = 'retired'",
                    "UPDATE blocks SET owner_account_id = (SELECT id FROM accounts WHERE code = 'DEV') "
                    "WHERE state = 'retired'",
                    "DELETE FROM blocks WHERE state = 'retired'"):
            with pytest.raises(asyncpg.CheckViolationError, match="never change"):
                await conn.execute(sql)
        for sql in ("UPDATE transfers SET cause_ref = 'x'", "DELETE FROM transfers", "TRUNCATE transfers",
                    "UPDATE retirements SET beneficiary = 'someone else'", "DELETE FROM issuances",
                    "TRUNCATE blocks"):
            with pytest.raises(asyncpg.CheckViolationError, match="append-only"):
                await conn.execute(sql)
        # Through the registry too: a retired range cannot be frozen, cancelled or moved.
        serial = ret.serials[0]
        for action in (registry.freeze, registry.cancel, registry.unfreeze):
            with pytest.raises(registry.CarbonxError) as e:
                await action(conn, serial=serial, reason="try")
            assert e.value.code == "credits_retired"
        assert (await registry.retirement_by_code(conn, ret.certificate_code))["quantity_kg"] == 2000

    run(body())


def test_unbalanced_ledger_entry_refused_by_raw_sql(conn, run):
    async def body():
        await world(conn)
        dev = await _dev_id(conn)
        entry = await conn.fetchval("INSERT INTO ledger_entries (kind, ref) VALUES ('adjustment', 'x') RETURNING id")
        with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
            await conn.execute("INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 100)",
                               entry, dev)
        custody = await conn.fetchval("SELECT id FROM accounts WHERE code = 'CX-CUSTODY'")
        # A member can never be driven below zero, even by a balanced entry.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, -100), ($1, $3, 100)",
                entry, dev, custody)
        await conn.execute(
            "INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, 100), ($1, $3, -100)",
            entry, dev, custody)
        with pytest.raises(asyncpg.CheckViolationError, match="append-only"):
            await conn.execute("UPDATE postings SET amount_fen = 1000")
        assert await conn.fetchval("SELECT sum(amount_fen) FROM postings") == 0
        assert await conn.fetchval("SELECT balance_fen FROM cash_balances WHERE account_id = $1", dev) == 100

    run(body())
