"""`carbonx demo`: play the launch scenario against the database and print the certificate."""

from __future__ import annotations

import asyncpg
import typer

from exchange.cli.common import DataDir, run_db, show_tonnes
from exchange.config import load_settings
from exchange.demo.scenario import run_scenario


def demo(data_dir: DataDir = None) -> None:
    """Register the launch projects, issue, settle subscriptions, retire 1.200 t for the launch event.

    Safe to run again: the second run changes nothing and prints the same certificate.
    """
    settings = load_settings(data_dir)
    typer.echo(f"database: {'DATABASE_URL' if settings.database_url else f'embedded PostgreSQL in {settings.pgdata}'}")

    async def body(conn: asyncpg.Connection) -> None:
        res = await run_scenario(conn, say=lambda line: typer.echo(f"  {line}"))
        typer.echo("")
        typer.echo(("retired " if res.first_run else "already retired ")
                   + f"{show_tonnes(res.retired_kg)} for the launch event")
        typer.echo(f"certificate code: {res.certificate_code}")
        typer.echo("retired serial ranges:")
        for s in res.serials:
            typer.echo(f"  {s}")
        typer.echo(f"verify: carbonx registry serial {res.serials[0]}")

    run_db(data_dir, body, member_assets=True)
