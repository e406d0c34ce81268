"""Replay both workloads through every engine in one run: commands/s and the Cython/reference ratio.

Workloads (matching/workloads.py): exchange-core-style, 3 M commands; simple, 1 M commands.
Engines: ``cython`` (run_batch, whole buffer in C), ``cython-api`` (one Python call per command),
``reference`` (pure Python). The figure in the summary table is the matching time measured inside
matching.replay.replay (excluding parsing and fill extraction); pytest-benchmark's own timing of
the whole call is shown alongside. CARBONX_BENCH_SCALE (default 1) scales the stream lengths,
e.g. 0.1 for a quick run. Streams are generated once and cached under bench/.cache/.
"""

from __future__ import annotations

import os
import time
from array import array
from pathlib import Path

import pytest

from matching.replay import replay
from matching.workloads import chunks_of, generate_batch

WORKLOADS = {"exchange-core": 3_000_000, "simple": 1_000_000}
ROUNDS = {"cython": 5, "cython-api": 3, "reference": 1}
CACHE = Path(__file__).parent / ".cache"

_streams: dict[str, list[array]] = {}


def cached_stream(workload: str, commands: int, seed: int) -> array:
    """The run_batch buffer of a generated workload, cached on disk (generation takes seconds)."""
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    path = CACHE / f"{workload}-{commands}-{seed}.q"
    buf = array("q")
    if path.exists():
        with path.open("rb") as f:
            buf.frombytes(f.read())
        return buf
    buf = generate_batch(workload, commands, seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        buf.tofile(f)
    tmp.rename(path)
    return buf


def stream(workload: str) -> list[array]:
    if workload not in _streams:
        scale = float(os.environ.get("CARBONX_BENCH_SCALE", "1"))
        n = max(1000, int(WORKLOADS[workload] * scale))
        _streams[workload] = chunks_of(cached_stream(workload, n, seed=1), 1 << 16)
    return _streams[workload]


@pytest.mark.parametrize("engine", ["cython", "cython-api", "reference"])
@pytest.mark.parametrize("workload", ["exchange-core", "simple"])
def test_replay(benchmark, request, workload: str, engine: str) -> None:
    chunks = stream(workload)
    rates = []

    def run() -> None:
        result = replay(chunks, engine)
        rates.append(result.rate)
        benchmark.extra_info["fills"] = result.fills
        benchmark.extra_info["commands"] = result.commands

    benchmark.group = workload
    benchmark.pedantic(run, rounds=ROUNDS[engine], iterations=1, warmup_rounds=0)
    best = max(rates)
    benchmark.extra_info["commands_per_s"] = round(best)
    request.node.user_properties.append(("carbonx_rate", (workload, engine, best)))
    assert benchmark.extra_info["fills"] > 0


@pytest.mark.parametrize("engine", ["cython", "reference"])
@pytest.mark.parametrize("workload", ["exchange-core", "simple"])
def test_api_with_events(benchmark, request, workload: str, engine: str) -> None:
    """Per-command API as a service would drive it: one call, then decode that call's events."""
    from matching.book import make_book
    from matching.events import OP_CANCEL, OP_MOVE, OP_SUBMIT

    cmds = [tuple(c[k : k + 8]) for c in stream(workload) for k in range(0, len(c), 8)]
    if engine == "reference":
        cmds = cmds[: len(cmds) // 5]  # the full stream takes minutes in pure Python
    rates = []

    def run() -> None:
        book = make_book(engine)
        submit, move, cancel, reduce, events = (
            book.submit, book.move, book.cancel, book.reduce, book.events)
        t0 = time.perf_counter()
        for op, oid, uid, flags, price, qty, _ts, _extra in cmds:
            if op == OP_MOVE:
                move(oid, price)
            elif op == OP_SUBMIT:
                submit(oid, uid, flags & 3, price, qty, (flags >> 2) & 3)
            elif op == OP_CANCEL:
                cancel(oid)
            else:
                reduce(oid, qty)
            events()
        rates.append(len(cmds) / (time.perf_counter() - t0))

    benchmark.group = workload + " (API + events)"
    benchmark.pedantic(run, rounds=ROUNDS["cython-api" if engine == "cython" else engine],
                       iterations=1, warmup_rounds=0)
    request.node.user_properties.append(
        ("carbonx_rate", (workload, engine + "-api+ev", max(rates))))
