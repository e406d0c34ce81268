"""The API keys `carbonx serve --demo` prints: each start replaces the previous start's keys, so a
demo restarted again and again (after a crash, say) leaves only the keys it printed last, and
keys made by hand for the same accounts are left alone (review26)."""

from __future__ import annotations

import asyncpg

from api.cli import _demo_setup
from exchange import accounts as acc


def test_each_demo_start_replaces_the_keys_it_printed_before(db, run) -> None:
    async def main() -> None:
        first = dict(await _demo_setup(db))
        conn = await asyncpg.connect(db)
        try:
            operator = await acc.get_account(conn, "OPERATOR")
            by_hand = await acc.create_api_key(conn, operator.id)
            second = dict(await _demo_setup(db))
            assert first.keys() == second.keys() and len(first) == 2
            for who in first:
                assert first[who] != second[who]
                assert await acc.account_for_key(conn, first[who]) is None, who
                assert await acc.account_for_key(conn, second[who]) is not None, who
            assert (await acc.account_for_key(conn, by_hand)).code == "OPERATOR"
        finally:
            await conn.close()

    run(main())
