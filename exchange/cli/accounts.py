"""`carbonx accounts`: create participants' accounts (with their first API key), list them, and
issue or revoke their API keys (a rotation, a leaked key)."""

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


@app.command("new-key")
def new_key(
    code: Annotated[str, typer.Argument(help="The account's code.")],
    revoke_others: Annotated[bool, typer.Option(help="Revoke the account's earlier keys in the same step "
                                                     "(a rotation, or a leaked key replaced).")] = False,
    data_dir: DataDir = None,
) -> None:
    """Issue another API key for an account; it is printed once, as the last line. Works beside a
    running exchange: revoked keys stop working there within 10 s (KEY_TTL), open websockets included."""

    async def body(conn: asyncpg.Connection) -> str:
        a = await acc.keyed_account(conn, code)
        key, revoked = await acc.rotate_api_key(conn, a.id, revoke_others=revoke_others)
        typer.echo(f"new API key for {a.code} ({a.role}); {revoked} earlier key(s) revoked; the key, shown only now:")
        return key

    typer.echo(run_db(data_dir, body))


@app.command("revoke-keys")
def revoke_keys(
    code: Annotated[str, typer.Argument(help="The account's code.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke every API key of an account (a leaked key, a member suspended); `new-key` issues
    another. Works beside a running exchange: the keys stop working within 10 s (KEY_TTL)."""

    async def body(conn: asyncpg.Connection) -> int:
        return await acc.revoke_api_keys(conn, (await acc.keyed_account(conn, code)).id)

    typer.echo(f"{run_db(data_dir, body)} API key(s) of {code} revoked")
