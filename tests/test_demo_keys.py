"""The API keys `carbonx serve --demo` prints: each start replaces the previous start's keys, so a
demo restarted again and again (after a crash, say) leaves only the keys it printed last, and
keys made by hand for the same accounts are left alone (review26)."""

from __future__ import annotations

import asyncpg
import pytest

from api.cli import _demo_setup
from exchange import accounts as acc
from exchange.errors import CarbonxError


def test_each_demo_start_replaces_the_keys_it_printed_before(db, run, capsys) -> None:
    async def main() -> None:
        first = dict(await _demo_setup(db))
        # Every step is reported, the launch retirement and its certificate too (review27, F12).
        said = capsys.readouterr().err
        assert "demo: retired 1.200 t for the launch event: certificate CX-" in said, said
        conn = await asyncpg.connect(db)
        try:
            operator = await acc.get_account(conn, "OPERATOR")
            by_hand = await acc.create_api_key(conn, operator.id)
            second = dict(await _demo_setup(db))
            assert "demo: already retired 1.200 t" in capsys.readouterr().err
            assert first.keys() == second.keys() and len(first) == 2
            for who in first:
                assert first[who] != second[who]
                assert await acc.account_for_key(conn, first[who]) is None, who
                assert await acc.account_for_key(conn, second[who]) is not None, who
            assert (await acc.account_for_key(conn, by_hand)).code == "OPERATOR"
        finally:
            await conn.close()

    run(main())


def test_serve_demo_beside_a_running_exchange_changes_nothing(db, run) -> None:
    """`carbonx serve --demo` next to a running exchange used to play the whole launch scenario
    into its database (accounts, issuances, deposits, a retirement) and revoke the keys the
    running demo had printed, and only then be refused (review27, F2)."""
    from exchange.service import ExchangeService
    from tests.registry_helpers import fingerprint

    async def main() -> None:
        svc = ExchangeService(db)
        await svc.start()
        conn = await asyncpg.connect(db)
        try:
            before = await fingerprint(conn)
            with pytest.raises(CarbonxError) as err:
                await _demo_setup(db)
            assert err.value.code == "service_running"
            assert await fingerprint(conn) == before
        finally:
            await conn.close()
            await svc.stop()

    run(main())
