"""`carbonx cash`: deposits, withdrawals and balances, idempotent by payment reference."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer

from exchange import journal, ledger
from exchange.accounts import get_account
from exchange.cli.common import DataDir, fail, run_db
from exchange.service import apply_due, now_us
from matching.units import UnitError, format_cash, parse_cash

app = typer.Typer(no_args_is_help=True)


def _amount(text: str) -> int:
    try:
        fen = parse_cash(text, "amount")
    except UnitError as e:
        fail(str(e), e.code)
    if fen <= 0:
        fail(f"amount must be more than zero, got {text!r}", "invalid_amount")
    return fen


def _report(p: ledger.Payment, bal: int) -> None:
    verb = "already recorded" if p.replayed else "recorded"
    typer.echo(f"{p.direction} {p.reference} of {format_cash(p.amount_fen)} CNY for {p.account} {verb}; "
               f"balance {format_cash(bal)} CNY")


@app.command()
def deposit(
    account: str,
    amount: Annotated[str, typer.Argument(help="CNY, at most 2 decimals, e.g. 110000.00")],
    reference: Annotated[str, typer.Option(help="The bank's payment reference (makes the deposit idempotent).")],
    data_dir: DataDir = None,
) -> None:
    """Credit cash received at the settlement bank."""
    fen = _amount(amount)

    async def body(conn: asyncpg.Connection) -> None:
        p = await ledger.deposit(conn, account=account, amount_fen=fen, reference=reference)
        _report(p, await ledger.balance(conn, account))

    run_db(data_dir, body, member_assets=True)


@app.command()
def withdraw(
    account: str,
    amount: Annotated[str, typer.Argument(help="CNY, at most 2 decimals")],
    reference: Annotated[str, typer.Option(help="The payment reference (makes the withdrawal idempotent).")],
    data_dir: DataDir = None,
) -> None:
    """Pay cash out to a member's bank account."""
    fen = _amount(amount)

    async def body(conn: asyncpg.Connection) -> None:
        # The ledger knows balances, not the cash the journal's open buy orders reserve: a payout
        # of that cash left the next start a core paying for trades with money gone.
        core = await journal.recover(conn)
        apply_due(core, max(now_us(), core.ts))  # as the next start will: an expired GTD buy reserves nothing
        acct = await get_account(conn, account)
        reserved = core.cash.get(acct.id, [0, 0])[1]
        p = await ledger.withdraw(conn, account=account, amount_fen=fen, reference=reference, reserved_fen=reserved)
        _report(p, await ledger.balance(conn, account))

    run_db(data_dir, body, member_assets=True)


@app.command()
def balance(account: str, data_dir: DataDir = None) -> None:
    """Show an account's cash balance."""

    async def body(conn: asyncpg.Connection) -> None:
        typer.echo(f"{account}: {format_cash(await ledger.balance(conn, account))} CNY")

    run_db(data_dir, body)
