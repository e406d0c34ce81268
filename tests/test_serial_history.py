"""The serial-history lookup over transfers (migration 0006) answers what the GiST did.

0006 replaced the GiST on transfers (issuance_id, serials) with a btree over (issuance_id, size
class of the range, lower bound) and a lookup, ``carbonx_transfers_overlapping``, that scans each
class from 2^k below the range. These tests compare it with the plain overlap predicate (a
sequential scan, and Python) on random histories with lengths at every class edge, check the
class function at the edges, that unbounded ranges are refused, that a large table is searched
through the index, and that ``registry.serial_history`` still lists a real registry's movements.
"""

from __future__ import annotations

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange import registry
from exchange.serials import format_serial
from tests.registry_helpers import world

ISSUED = 9_000_000_000  # serials [1, ISSUED] of the issuance the random histories use

_COLUMNS = ("issuance_id", "serials", "from_account_id", "from_state", "to_account_id", "to_state", "cause",
            "cause_ref")


def _lengths() -> st.SearchStrategy[int]:
    edges = [1 << k for k in range(34)]
    near = sorted({max(1, e + d) for e in edges for d in (-1, 0, 1)})
    return st.one_of(st.sampled_from(near), st.integers(1, 2000), st.integers(1, ISSUED - 1))


ranges = st.tuples(_lengths(), st.floats(0, 1)).map(
    lambda t: (1 + int(t[1] * (ISSUED - t[0])), 1 + int(t[1] * (ISSUED - t[0])) + t[0]))


async def _history_world(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """(issuance id with ISSUED serials, another issuance's id, an account id)."""
    await world(conn)
    other = await conn.fetchval("SELECT id FROM issuances")
    big = await registry.issue(conn, project="FOREST", vintage=2024, quantity_kg=ISSUED)
    return big.id, other, await conn.fetchval("SELECT id FROM accounts WHERE code = 'DEV'")


async def _add(conn: asyncpg.Connection, iss: int, acct: int, spans: list[tuple[int, int]]) -> None:
    await conn.copy_records_to_table("transfers", columns=_COLUMNS, records=[
        (iss, asyncpg.Range(lo, hi), acct, "available", acct, "encumbered", "encumber", f"t{lo}-{hi}")
        for lo, hi in spans])


async def _lookup(conn: asyncpg.Connection, iss: int, lo: int, hi: int) -> list[int]:
    return [r[0] for r in await conn.fetch(
        "SELECT id FROM carbonx_transfers_overlapping($1, int8range($2, $3)) ORDER BY id", iss, lo, hi)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(ranges, min_size=1, max_size=60), queries=st.lists(ranges, min_size=1, max_size=8),
       data=st.data())
def test_lookup_equals_the_overlap_predicate_on_random_histories(conn, run, history, queries, data):
    async def body():
        if not await conn.fetchval("SELECT count(*) FROM issuances"):
            await _history_world(conn)
        big, other, acct = await conn.fetchval("SELECT max(id) FROM issuances"), \
            await conn.fetchval("SELECT min(id) FROM issuances"), await conn.fetchval(
                "SELECT id FROM accounts WHERE code = 'DEV'")
        await _add(conn, big, acct, history)
        await _add(conn, other, acct, [(1, 1000)])  # another issuance's transfer is never an answer
        rows = await conn.fetch("SELECT id, issuance_id, lower(serials), upper(serials) FROM transfers")
        # Query ranges: random ones, and some that touch a stored transfer's bounds exactly.
        asked = list(queries) + [data.draw(st.sampled_from([(lo, lo + 1), (hi - 1, hi), (hi, hi + 1),
                                                            (max(1, lo - 1), lo)]))
                                 for lo, hi in data.draw(st.lists(st.sampled_from(history), max_size=4))]
        for lo, hi in asked:
            expected = sorted(r[0] for r in rows if r[1] == big and r[2] < hi and r[3] > lo)
            assert await _lookup(conn, big, lo, hi) == expected, (lo, hi)
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
                assert [r[0] for r in await conn.fetch(
                    "SELECT id FROM transfers WHERE issuance_id = $1 AND serials && int8range($2, $3) ORDER BY id",
                    big, lo, hi)] == expected

    run(body())


def test_size_classes_at_their_edges(conn, run):
    async def body():
        cases = [(1, 1), (2, 2), (3, 2), (4, 3), (1023, 10), (1024, 11), (1025, 11), ((1 << 33) + 5, 34),
                 ((1 << 34) - 1, 34), (1 << 34, 35), (1 << 40, 35)]
        for length, k in cases:
            assert await conn.fetchval("SELECT carbonx_serials_class(int8range(7, 7 + $1::bigint))", length) == k

    run(body())


def test_unbounded_transfer_ranges_are_refused(conn, run):
    async def body():
        big, _other, acct = await _history_world(conn)
        for rng in ("int8range(5, NULL)", "int8range(NULL, 5)"):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(
                    "INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, "
                    f"to_state, cause, cause_ref) VALUES ($1, {rng}, $2, 'available', $2, 'frozen', 'freeze', 'x')",
                    big, acct)

    run(body())


def test_a_large_history_is_searched_through_the_index(conn, run):
    async def body():
        big, _other, acct = await _history_world(conn)
        spans = [(1 + i * 997 % (ISSUED - 5000), 1 + i * 997 % (ISSUED - 5000) + 1000 + i % 3000)
                 for i in range(20_000)]
        await _add(conn, big, acct, spans)
        await conn.execute("ANALYZE transfers")
        lo, hi = spans[123]
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT id FROM carbonx_transfers_overlapping($1, int8range($2, $3))", big, lo, hi))
        assert "transfers_by_serial_class" in plan and "Seq Scan on transfers" not in plan, plan
        expected = sorted(i + 1 for i, (a, b) in enumerate(spans) if a < hi and b > lo)
        got = await conn.fetch("SELECT t.id FROM carbonx_transfers_overlapping($1, int8range($2, $3)) t "
                               "WHERE t.cause = 'encumber' ORDER BY t.id", big, lo, hi)
        first = await conn.fetchval("SELECT min(id) FROM transfers WHERE cause = 'encumber'")
        assert [r[0] - first + 1 for r in got] == expected

    run(body())


def test_serial_history_lists_every_movement_of_a_range(conn, run):
    async def body():
        iss = await world(conn)
        await registry.transfer(conn, from_account="DEV", to_account="BUY", quantity_kg=30_000, symbol="FOREST-2023",
                                cause_ref="otc:1")
        await registry.transfer(conn, from_account="BUY", to_account="DEV", quantity_kg=5_000, symbol="FOREST-2023",
                                cause_ref="otc:2")
        await registry.retire(conn, account="BUY", quantity_kg=10_000, beneficiary="Expo", purpose="2026 expo",
                             symbol="FOREST-2023")
        for lo, hi in ((1, 2), (5_000, 5_001), (4_990, 25_010), (29_999, 30_002), (1, iss.hi), (90_000, 100_001)):
            serial = format_serial(iss.scheme, iss.project_code, iss.vintage, lo, hi)
            _iss, _rng, history, _now = await registry.serial_history(conn, serial)
            expected = await conn.fetch(
                "SELECT id, cause_ref FROM transfers WHERE issuance_id = $1 AND serials && int8range($2, $3) "
                "ORDER BY id", iss.id, lo, hi)
            assert [(h["id"], h["cause_ref"]) for h in history] == [tuple(r) for r in expected]
            assert history and history[0]["cause"] == "issuance"

    run(body())
