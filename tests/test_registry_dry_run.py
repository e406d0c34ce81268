"""A dry run of a registry change (dry_run=True on retire, freeze, unfreeze and cancel) refuses
what the change would refuse and changes nothing, also inside a caller's transaction; a refused
retirement uses up no retirement id (the ids are public, on certificates). The unit model
(test_registry_model.py) checks the dry run against the change on random sequences."""

import asyncpg
import pytest

from exchange import registry
from exchange.errors import CarbonxError
from tests.registry_helpers import fingerprint, world

SYM = "FOREST-2023"


def test_a_dry_run_inside_a_callers_transaction_checks_and_changes_nothing(conn, run):
    async def body():
        iss = await world(conn, tonnes=10)
        before = await fingerprint(conn)
        async with conn.transaction():  # READ COMMITTED, as a caller's would be
            assert await registry.retire(conn, account="DEV", quantity_kg=1000, beneficiary="b", purpose="p",
                                         symbol=SYM, dry_run=True) is None
            with pytest.raises(CarbonxError) as refused:
                await registry.retire(conn, account="DEV", quantity_kg=10_001, beneficiary="b", purpose="p",
                                      symbol=SYM, dry_run=True)
            assert refused.value.code == "insufficient_credits"
        await conn.execute("BEGIN")
        try:
            planned = await registry.freeze(conn, serial=iss.serial, reason="audit", dry_run=True)
            assert planned.quantity == 10_000
            with pytest.raises(CarbonxError) as refused:
                await registry.unfreeze(conn, serial=iss.serial, reason="audit", dry_run=True)
            assert refused.value.code == "credits_available"
        finally:
            await conn.execute("ROLLBACK")
        assert await fingerprint(conn) == before
        # and the change itself, as before, inside the caller's transaction
        async with conn.transaction():
            await registry.retire(conn, account="DEV", quantity_kg=1000, beneficiary="b", purpose="p", symbol=SYM)

    run(body())


def test_a_refused_retirement_uses_up_no_retirement_id(db, run):
    """Refused for want of credits, before the certificate's row is made (it used to be inserted,
    then rolled back, leaving a gap in the public ids: review22)."""
    async def body():
        conn = await asyncpg.connect(db)
        try:
            await world(conn, tonnes=10)
            for qty in (10_001, 20_000):
                with pytest.raises(CarbonxError) as refused:
                    await registry.retire(conn, account="DEV", quantity_kg=qty, beneficiary="b", purpose="p",
                                          symbol=SYM)
                assert refused.value.code == "insufficient_credits"
            first = await registry.retire(conn, account="DEV", quantity_kg=1000, beneficiary="b", purpose="p",
                                          symbol=SYM)
            assert first.id == 1
        finally:
            await conn.close()

    run(body())
