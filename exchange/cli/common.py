"""What every `carbonx` command shares: the --data-dir option, opening the database, and errors.

A command body is a coroutine taking a connection. `run_db` prepares the database (starting the
embedded server unless DATABASE_URL is set, applying migrations), runs the body, and turns a
refused request into one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import click
import typer

from exchange import journal, projector
from exchange.config import load_settings
from exchange.database import prepare_database
from exchange.errors import CarbonxError
from exchange.service import refuse_while_serving
from matching.units import UnitError, format_tonnes, parse_tonnes

T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="CARBONX_DATA_DIR",
        help="Where carbonx keeps its data (embedded PostgreSQL); default ~/.local/share/carbonx.",
        show_default=False,
    ),
]


def fail(message: str, code: str | None = None) -> None:
    """Print a refusal on stderr and exit 1."""
    suffix = f" [{code}]" if code else ""
    typer.secho(f"error: {message}{suffix}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def run_db(data_dir: Path | None, body: Callable[[asyncpg.Connection], Awaitable[T]], *,
           member_assets: bool = False, service_off: bool = False) -> T:
    """Open the database under `data_dir` (or DATABASE_URL), run `body`, close.

    `member_assets` marks a command that takes cash or credits from a member: it is refused while
    the exchange service runs, because the service then owns them (exchange/service.py), and
    while journal entries are not yet settled (after a crash): the journal may have promised the
    credits or cash to an order or a trade, and a change made under it would leave an entry the
    next start could not settle. `service_off` refuses only while the service runs. Either keeps
    the service from starting until `body` has finished.
    """

    async def main() -> T:
        dsn = await prepare_database(load_settings(data_dir))
        conn = await asyncpg.connect(dsn)
        try:
            if member_assets or service_off:
                await refuse_while_serving(conn, hold=True)  # let go when the connection closes
            if member_assets:
                await refuse_while_unsettled(conn)
            return await body(conn)
        finally:
            await conn.close()

    with one_line_errors():
        return asyncio.run(main())
    raise AssertionError("unreachable")


@contextlib.contextmanager
def one_line_errors(os_code: str = "database_error") -> Iterator[None]:
    """Turn what stops a command into one clear line on stderr and exit status 1: a refusal, a
    database's, an operating system's (`os_code`), and anything else by its type and message (a
    traceback is for developers: CARBONX_TRACEBACK=1 lets it through)."""
    try:
        yield
    except (typer.Exit, typer.Abort, click.ClickException):
        raise
    except CarbonxError as e:
        fail(e.message, e.code)
    except UnitError as e:
        fail(str(e), e.code)
    except asyncpg.DataError as e:  # refused before it reached the server: a number beyond int64, say
        fail(f"a value is out of range: {str(e).replace('query argument $1: ', '')}", "invalid_request")
    except asyncpg.IntegrityConstraintViolationError as e:  # the message without the failing row's dump
        fail(f"the database refused it ({e.constraint_name or 'a rule'}): {e.args[0] if e.args else e}",
             "invalid_request")
    except asyncpg.PostgresError as e:
        fail(f"database: {e}", "database_error")
    except OSError as e:
        fail(f"database: {e}" if os_code == "database_error" else str(e), os_code)
    except Exception as e:
        if os.environ.get("CARBONX_TRACEBACK"):
            raise
        fail(f"{type(e).__name__}: {e} (CARBONX_TRACEBACK=1 shows where)", "internal_error")


async def refuse_while_unsettled(conn: asyncpg.Connection) -> None:
    """Raise `unsettled_journal` when the journal holds entries the registry and ledger do not
    reflect yet."""
    pending = await journal.last_seq(conn) - await projector.position(conn)
    if pending > 0:
        raise CarbonxError("unsettled_journal",
                           f"{pending:,} journal entries are not settled yet (the exchange stopped before it "
                           "settled them); run `carbonx clearing settle` (or start the exchange) first")


def tonnes(text: str, what: str = "quantity") -> int:
    """A positive tonnes string from the command line, in kg; exits with a clear error otherwise."""
    try:
        kg = parse_tonnes(text, what)
    except UnitError as e:
        fail(str(e), e.code)
    if kg <= 0:
        fail(f"{what} must be more than zero, got {text!r}", "invalid_quantity")
    return kg


def show_tonnes(kg: int) -> str:
    return f"{format_tonnes(kg)} t"


def echo_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print rows as an aligned table."""
    if not rows:
        typer.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        typer.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
