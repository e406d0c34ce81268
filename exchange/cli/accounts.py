"""`carbonx accounts`: create participants' accounts (with their first API key) and list them."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer

from exchange import accounts as acc
from exchange.cli.common import DataDir, echo_rows, run_db

app = typer.Typer(no_args_is_help=True)


@app.command()
def create(
    code: Annotated[str, typer.Argument(help="Account code: upper-case letters, digits, '-' and '_'.")],
    kind: Annotated[str, typer.Option(help=f"Who it is: {', '.join(acc.KINDS)}.")],
    role: Annotated[str | None, typer.Option(help="operator (runs the registry) or member (trades, retires); "
                                                  "by default operator for kind operator, else member.")] = None,
    name: Annotated[str, typer.Option(help="Display name (default: the code).")] = "",
    data_dir: DataDir = None,
) -> None:
    """Create an account and its first API key; the key is printed once, as the last line."""

    async def body(conn: asyncpg.Connection) -> str:
        async with conn.transaction():
            a = await acc.create_account(conn, code, name, kind, role or acc.default_role(kind))
            key = await acc.create_api_key(conn, a.id)
        typer.echo(f"created account {a.code} ({a.kind}, {a.role}); its API key, shown only now:")
        return key

    typer.echo(run_db(data_dir, body))


@app.command("list")
def list_(data_dir: DataDir = None) -> None:
    """List every account."""

    async def body(conn: asyncpg.Connection) -> None:
        echo_rows([a.__dict__ for a in await acc.list_accounts(conn)], ["code", "kind", "role", "name"])

    run_db(data_dir, body)
