"""Fixtures shared by tests/ and bench/: a real PostgreSQL (embedded, or DATABASE_URL) and a fresh database per test.

The embedded server starts once per session under a temporary directory. A template database is
migrated once; each test that asks for `db` gets its own copy (`CREATE DATABASE … TEMPLATE`), which
takes a few tens of milliseconds and isolates tests completely. Tests are synchronous and run
coroutines on one session-wide event loop through `run`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import asyncpg
import pytest

from exchange.database import (
    create_template,
    drop_database,
    ensure_database,
    start_private_embedded_server,
    with_database,
)

_counter = itertools.count()


@pytest.fixture(scope="session")
def run() -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run a coroutine to completion on the session's event loop."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server for the tests: DATABASE_URL, or a fresh embedded one.

    The embedded cluster lives in a private temporary directory (not pytest's numbered tmp dirs,
    which concurrent pytest sessions prune under each other) and is removed after the server stops.
    """
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    # A private directory, not pytest's numbered basetemp: concurrent pytest sessions prune those.
    yield start_private_embedded_server("carbonx-test-pg-")


@pytest.fixture(scope="session")
def template_db(pg_server: str, run) -> Iterator[str]:
    """Name of a migrated template database, dropped at the end of the session."""
    name = f"cx_template_{os.getpid()}"
    run(create_template(pg_server, name))
    yield name
    run(drop_database(pg_server, name))


@pytest.fixture
def db(pg_server: str, template_db: str, run) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test's own."""
    name = f"cx_test_{os.getpid()}_{next(_counter)}"
    run(ensure_database(pg_server, name, template=template_db))
    yield with_database(pg_server, name)
    run(drop_database(pg_server, name))


@pytest.fixture
def conn(db: str, run) -> Iterator[asyncpg.Connection]:
    """An open connection to this test's database."""
    c = run(asyncpg.connect(db))
    yield c
    run(c.close())
