"""The registry end to end on a real database: issue, transfer, retire, read back."""

from exchange import ledger, registry
from exchange.accounts import create_account


def test_issue_transfer_retire(conn, run):
    async def body():
        await create_account(conn, "DEV", "Developer", "project_developer")
        await create_account(conn, "BUY", "Buyer", "enterprise")
        await registry.add_project(conn, code="LQS-FS", name="Forest", methodology="forest_carbon_sink",
                                   developer="DEV")
        iss = await registry.issue(conn, project="LQS-FS", vintage=2023, quantity_kg=6_000_000)
        assert (iss.lo, iss.hi) == (1, 6_000_001)
        assert iss.serial == "CDHF-LQS-FS-2023-0000000001-0006000000"
        res = await registry.transfer(conn, from_account="DEV", to_account="BUY", quantity_kg=2000,
                                      symbol="LQS-FS-2023", cause_ref="otc-1")
        assert [(p.lo, p.hi) for p in res.pieces] == [(1, 2001)]
        ret = await registry.retire(conn, account="BUY", quantity_kg=1200, beneficiary="Launch",
                                    purpose="Launch event", symbol="LQS-FS-2023")
        assert ret.serials == ("CDHF-LQS-FS-2023-0000000001-0000001200",)
        blocks = await registry.issuance_blocks(conn, iss.id)
        assert [(b["lo"], b["hi"], b["owner"], b["state"]) for b in blocks] == [
            (1, 1201, "BUY", "retired"), (1201, 2001, "BUY", "available"), (2001, 6_000_001, "DEV", "available"),
        ]
        await ledger.deposit(conn, account="BUY", amount_fen=100_000, reference="bank-1")
        assert await ledger.balance(conn, "BUY") == 100_000
        assert await ledger.ledger_total(conn) == 0

    run(body())
