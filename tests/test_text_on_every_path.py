"""Text that REST refuses (control and bidi characters, exchange/text.py) is refused on every other
way into the registry too, changing nothing: account and project names, regions, issuance and
transfer references. The command line wrote them as given (review27, F3); they end up on
certificates, pages and terminals."""

from __future__ import annotations

import pytest

from exchange import registry
from exchange.accounts import create_account
from exchange.errors import CarbonxError
from tests.registry_helpers import fingerprint, world

EVIL = ["Alice\x1b[2J\nforged: line", "\u202eecilA", "Forest\u200f Park", "VR-1\x07", "line\u2028break"]


@pytest.mark.parametrize("text", EVIL)
def test_unsafe_text_is_refused_on_every_registry_path(conn, run, text: str) -> None:
    async def main() -> None:
        await world(conn)
        before = await fingerprint(conn)
        attempts = {
            "invalid_name": [
                lambda: create_account(conn, "EVIL", text, "individual"),
                lambda: registry.add_project(conn, code="EVILP", name=text, methodology="other", developer="DEV"),
            ],
            "invalid_project": [
                lambda: registry.add_project(conn, code="EVILR", name="Forest", region=text, methodology="other",
                                             developer="DEV"),
            ],
            "invalid_reference": [
                lambda: registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=1000, reference=text),
                lambda: registry.transfer(conn, from_account="DEV", to_account="BUY", quantity_kg=1000,
                                          symbol="FOREST-2023", cause_ref=text),
            ],
        }
        for code, calls in attempts.items():
            for call in calls:
                with pytest.raises(CarbonxError) as err:
                    await call()
                assert err.value.code == code, err.value
        assert await fingerprint(conn) == before

    run(main())


def test_transfer_references_and_project_codes_are_refused_in_words(conn, run) -> None:
    """Said before the database says it in its own words (a constraint name and a row dump)."""
    async def main() -> None:
        await world(conn)
        for ref in ("", "   ", "x" * 201):
            with pytest.raises(CarbonxError) as err:
                await registry.transfer(conn, from_account="DEV", to_account="BUY", quantity_kg=1000,
                                        symbol="FOREST-2023", cause_ref=ref)
            assert err.value.code == "invalid_reference"
        for code in ("KILN_X", "K" * 33, "A--B", "lower", "-AB"):  # the projects table's rule, not accounts'
            with pytest.raises(CarbonxError) as err:
                await registry.add_project(conn, code=code, name="Kiln", methodology="other", developer="DEV")
            assert err.value.code == "invalid_code" and "at most 32" in err.value.message, err.value

    run(main())
