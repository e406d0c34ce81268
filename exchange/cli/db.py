"""`carbonx db`: create and migrate the database, and show where it is."""

from __future__ import annotations

import asyncpg
import typer

from exchange.cli.common import DataDir, run_db
from exchange.config import load_settings
from exchange.database import applied_migrations, load_migrations

app = typer.Typer(no_args_is_help=True)


async def _status(conn: asyncpg.Connection) -> None:
    done = await applied_migrations(conn)
    for mig in load_migrations():
        mark = "applied" if mig.version in done else "pending"
        typer.echo(f"  {mig.version:04d}_{mig.name}: {mark}")


@app.command()
def init(data_dir: DataDir = None) -> None:
    """Create the database (starting the embedded server if needed) and apply every migration."""
    settings = load_settings(data_dir)
    run_db(data_dir, _status)
    where = "DATABASE_URL" if settings.database_url else f"embedded PostgreSQL in {settings.pgdata}"
    typer.echo(f"database ready ({where})")


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply migrations not yet applied (every command also does this at start)."""
    run_db(data_dir, _status)


@app.command()
def status(data_dir: DataDir = None) -> None:
    """Show the server in use, the migrations and how much the registry holds."""
    settings = load_settings(data_dir)

    async def body(conn: asyncpg.Connection) -> None:
        typer.echo(f"server: {'DATABASE_URL' if settings.database_url else settings.pgdata}")
        typer.echo(f"version: {await conn.fetchval('SHOW server_version')}")
        typer.echo("migrations:")
        await _status(conn)
        for table in ("accounts", "projects", "issuances", "blocks", "transfers", "retirements", "postings"):
            typer.echo(f"  {table}: {await conn.fetchval(f'SELECT count(*) FROM {table}')} rows")

    run_db(data_dir, body)
