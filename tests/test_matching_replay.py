"""Tests of the replay tool, its text format and the workload generators."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from typer.testing import CliRunner

from exchange.cli import replay as replay_cli
from matching.replay import STRIDE, StreamError, parse_chunks, parse_file_chunks, replay
from matching.workloads import chunks_of, generate_batch, write_stream

STREAM = """\
P 1 10 1 0 100 5
P 2 11 1 0 100 5
P 3 12 1 0 101 5
R 1 10 2
P 4 13 0 1 101 9
C 99 1
M 77 1 100
R 55 1 1
M 3 12 99
P 5 14 1 2 99 100
P 6 14 1 2 99 7
"""
# 4 (IOC bid 101 x9) takes 1 (3 left after R), then 2 (5), then 1 of 3 at 101;
# 3 moves to 99 with 4 left; FOK 5 is unfillable, FOK 6 is on the ask side and does not trade.
EXPECTED_FILLS = "4 1 100 3\n4 2 100 5\n4 3 101 1\n"


@pytest.mark.parametrize("engine", ["cython", "cython-api", "reference"])
def test_replay_fills(engine: str) -> None:
    out = io.StringIO()
    result = replay(parse_chunks(STREAM.splitlines()), engine, fills_out=out)
    assert out.getvalue() == EXPECTED_FILLS
    assert result.commands == 11
    assert result.fills == 3


def test_reduce_loses_priority_flag_changes_fills() -> None:
    out = io.StringIO()
    replay(parse_chunks(STREAM.splitlines()), "cython", True, out)
    assert out.getvalue().splitlines()[0] == "4 2 100 5"


BAD_LINES = ["P 1 2 3", "X 1 2", "P 1 2 0 7 100 5", "C a b", "M 1 2", "C 1 2 3", "P1 1 2",
             "C +1 2", "C 1_0 2", "C 1- 2", "C - 2", "C 99999999999999999999 2", "R 1 2 3x",
             "P 1 2 -1 0 100 5", "C \u0661 2"]


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_lines_are_errors_in_both_parsers(tmp_path, line: str) -> None:
    with pytest.raises(StreamError):
        list(parse_chunks([line]))
    path = tmp_path / "s.txt"
    path.write_text("C 1 2\n" + line + "\n", encoding="utf-8")
    with pytest.raises(StreamError, match="line 2"):
        list(parse_file_chunks(str(path)))


def test_c_parser_equals_python_parser(tmp_path) -> None:
    text = STREAM.replace("\n", "\r\n", 3) + "\n  \n\tC 5 6\nR -7 1 9223372036854775807\nM 1 2 -9223372036854775808"
    path = tmp_path / "s.txt"
    path.write_text(text)
    for chunk in (1, 3, 1000):
        fast = [c for buf in parse_file_chunks(str(path), chunk) for c in buf]
        slow = [c for buf in parse_chunks(text.splitlines(), chunk) for c in buf]
        assert fast == slow
        assert len(fast) == 14 * STRIDE
    path.write_text("")
    assert list(parse_file_chunks(str(path))) == []


@pytest.mark.parametrize("workload", ["exchange-core", "simple"])
def test_engines_agree_on_workloads(workload: str) -> None:
    buf = generate_batch(workload, 20_000, seed=3)
    fills = {}
    for engine in ("cython", "cython-api", "reference"):
        for lose in (False, True):
            out = io.StringIO()
            replay(chunks_of(buf, 4096), engine, lose, out)
            fills[(engine, lose)] = out.getvalue()
    for lose in (False, True):
        assert fills[("cython", lose)] == fills[("reference", lose)] == fills[("cython-api", lose)]
        assert fills[("cython", lose)].count("\n") > 100


def test_generators_are_deterministic_by_seed() -> None:
    a = generate_batch("exchange-core", 5000, seed=7)
    assert a == generate_batch("exchange-core", 5000, seed=7)
    assert a != generate_batch("exchange-core", 5000, seed=8)


def _mix(buf) -> Counter:
    c: Counter = Counter()
    for k in range(0, len(buf), STRIDE):
        op = buf[k]
        c[(op, (buf[k + 3] >> 2) & 3) if op == 1 else op] += 1
    return c


def test_exchange_core_mix_and_trade_rate() -> None:
    n = 100_000
    buf = generate_batch("exchange-core", n, seed=1)
    mix = _mix(buf)
    expect = {(1, 0): 0.12, (1, 1): 0.02, (1, 2): 0.001, 2: 0.07, 3: 0.72, 4: 0.07}
    for key, share in expect.items():
        assert abs(mix[key] / n - share) < max(0.01, share * 0.25), (key, mix[key] / n)
    out = io.StringIO()
    result = replay(chunks_of(buf, 1 << 14), "cython", fills_out=out)
    takers = {line.split()[0] for line in out.getvalue().splitlines()}
    assert 0.01 < len(takers) / n < 0.04
    assert result.fills > 0


def test_simple_mix() -> None:
    n = 50_000
    mix = _mix(generate_batch("simple", n, seed=1))
    assert abs(mix[(1, 0)] / n - 0.60) < 0.01
    assert abs(mix[2] / n - 0.30) < 0.01
    assert abs(mix[(1, 1)] / n - 0.10) < 0.01


def test_cli_gen_and_replay(tmp_path) -> None:
    runner = CliRunner()
    stream = tmp_path / "s.txt"
    fills = tmp_path / "f.txt"
    res = runner.invoke(replay_cli.app, ["replay-gen", "--workload", "simple", "--commands",
                                         "3000", "--seed", "5", str(stream)])
    assert res.exit_code == 0, res.output
    assert len(stream.read_text().splitlines()) == 3000
    for engine in ("cython", "reference"):
        res = runner.invoke(replay_cli.app, ["replay", str(stream), "--engine", engine,
                                             "--fills", str(fills)])
        assert res.exit_code == 0, res.output
        first = res.output.splitlines()[0].split()
        # "N commands in S s: R commands/s", all plain numbers so scripts can read them.
        assert first[:3] == ["3000", "commands", "in"] and first[4:5] == ["s:"]
        assert float(first[3]) >= 0 and int(first[5]) > 0 and first[6] == "commands/s"
        n_fills = len(fills.read_text().splitlines())
        assert n_fills > 0
        assert res.output.rstrip().endswith(f"{n_fills} fills")
    bad = tmp_path / "bad.txt"
    bad.write_text("P 1 2\n")
    res = runner.invoke(replay_cli.app, ["replay", str(bad)])
    assert res.exit_code == 1  # a refused stream, as every refused input (a missing file is a usage error)
    res = runner.invoke(replay_cli.app, ["replay", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2
    assert "Invalid value for 'stream'" in res.output


def test_write_stream_round_trips(tmp_path) -> None:
    path = tmp_path / "ec.txt"
    write_stream(str(path), "exchange-core", 2000, seed=2)
    parsed = [c for chunk in parse_chunks(path.read_text().splitlines()) for c in chunk]
    assert parsed == list(generate_batch("exchange-core", 2000, seed=2))
    assert [c for chunk in parse_file_chunks(str(path), 333) for c in chunk] == parsed
