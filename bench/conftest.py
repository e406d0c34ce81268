"""Benchmark plumbing: collect bench_*.py files and print the matching throughput table.

Run with ``pytest bench/ --benchmark-only`` (benchmarks are not in the default test run). A
benchmark that records ``("carbonx_rate", (workload, engine, commands_per_s))`` in its
user_properties shows up in the summary table with its ratio to the reference engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_RATES: dict[tuple[str, str], float] = {}


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
        for engine in ("cython", "cython-api", "reference"):
            rate = _RATES.get((workload, engine))
            if rate is None:
                continue
            ratio = f"   {rate / ref:6.1f}x reference" if ref and engine != "reference" else ""
            tr.write_line(f"{workload:14s} {engine:11s} {rate:>13,.0f} commands/s{ratio}")
