"""Replay of the plain-text command stream used for benchmarks and cross-engine testing.

Format, one command a line, integers only (price in ticks, quantity in lots; no bands, sessions
or self-trade prevention; uid only names the owner)::

    P id uid side type price qty     side 0=bid 1=ask; type 0=GTC 1=IOC 2=FOK
    M id uid new_price               move: cancel-replace at a new price (loses priority)
    C id uid                         cancel
    R id uid reduce_by               quantity decrease (keeps priority unless configured)

Commands are turned into the books' run_batch layout (matching/events.py OP_*, 8 int64 per
command) and executed in chunks. Engines: ``cython`` (the Cython book's batch entry point: the
whole chunk runs inside C), ``cython-api`` (the Cython book through its per-command Python API)
and ``reference`` (the pure-Python book, per command). Unknown ids in C/M/R produce not_found
rejects inside the book, which the replay ignores. Fills come out as (taker_id, maker_id, price,
qty). Only the matching is timed; parsing and writing fills are not.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from matching.book import make_book
from matching.events import OP_CANCEL, OP_MOVE, OP_REDUCE, OP_SUBMIT

STRIDE = 8
CHUNK = 1 << 16  # commands per batch: bounds the event buffer, long enough to amortise the call
REPLAY_ENGINES = ("cython", "cython-api", "reference")


class StreamError(ValueError):
    """A line of a replay stream that does not follow the format."""


def _int(text: str) -> int:
    # int() would also take "+5", "1_000" and non-ASCII digits; the format (and the C parser)
    # allows only an optional '-' and ASCII digits.
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise StreamError(f"not an integer: {text!r}")
    return int(text)


def parse_line(line: str, buf: array) -> None:
    """Append one text command to `buf` in run_batch layout."""
    f = line.split()
    try:
        kind = f[0]
        if kind == "P" and len(f) == 7:
            side, tif = _int(f[3]), _int(f[4])
            if side not in (0, 1) or tif not in (0, 1, 2):
                raise StreamError(f"bad side or type in {line!r}")
            cmd = (OP_SUBMIT, _int(f[1]), _int(f[2]), side | tif << 2, _int(f[5]), _int(f[6]), 0, 0)
        elif kind == "M" and len(f) == 4:
            cmd = (OP_MOVE, _int(f[1]), _int(f[2]), 0, _int(f[3]), 0, 0, 0)
        elif kind == "C" and len(f) == 3:
            cmd = (OP_CANCEL, _int(f[1]), _int(f[2]), 0, 0, 0, 0, 0)
        elif kind == "R" and len(f) == 4:
            cmd = (OP_REDUCE, _int(f[1]), _int(f[2]), 0, 0, _int(f[3]), 0, 0)
        else:
            raise StreamError(f"cannot read command {line!r}")
        buf.extend(cmd)
    except (IndexError, ValueError, OverflowError) as exc:
        raise StreamError(f"cannot read command {line!r}") from exc


def parse_chunks(lines: Iterable[str], chunk: int = CHUNK) -> Iterator[array]:
    """Parse text lines into run_batch buffers of at most `chunk` commands (blank lines skipped)."""
    buf = array("q")
    for line in lines:
        if not line.strip():
            continue
        parse_line(line, buf)
        if len(buf) == chunk * STRIDE:
            yield buf
            buf = array("q")
    if buf:
        yield buf


def parse_file_chunks(path: str, chunk: int = CHUNK) -> Iterator[array]:
    """Like :func:`parse_chunks` on a file, parsed in C (cext.streamparse) when it is built."""
    try:
        from cext.streamparse import parse
    except ImportError:  # an unbuilt checkout still replays, just slower
        with open(path) as f:
            yield from parse_chunks(f, chunk)
        return
    with open(path, "rb") as f:
        data = f.read()
    pos, line = 0, 1
    while pos < len(data):
        try:
            buf, pos, line = parse(data, pos, chunk, line)
        except ValueError as exc:
            raise StreamError(str(exc)) from exc
        if buf:
            yield buf


def format_command(cmd: Iterable[int]) -> str:
    """One run_batch command back to its text line (for generators and debugging)."""
    op, oid, uid, flags, price, qty, _ts, _extra = cmd
    if op == OP_SUBMIT:
        return f"P {oid} {uid} {flags & 3} {(flags >> 2) & 3} {price} {qty}"
    if op == OP_MOVE:
        return f"M {oid} {uid} {price}"
    if op == OP_CANCEL:
        return f"C {oid} {uid}"
    if op == OP_REDUCE:
        return f"R {oid} {uid} {qty}"
    raise StreamError(f"op {op} has no text form")


@dataclass
class ReplayResult:
    commands: int
    seconds: float
    fills: int

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.commands} commands in {self.seconds:.3f} s: {self.rate:.0f} commands/s; "
                f"{self.fills} fills")


def _run_api(book: Any, buf: array) -> None:
    """Drive a book through its per-command Python API (what a service would do)."""
    submit, move, cancel, reduce = book.submit, book.move, book.cancel, book.reduce
    for k in range(0, len(buf), STRIDE):
        op = buf[k]
        if op == OP_MOVE:
            move(buf[k + 1], buf[k + 4])
        elif op == OP_SUBMIT:
            flags = buf[k + 3]
            submit(buf[k + 1], buf[k + 2], flags & 3, buf[k + 4], buf[k + 5], (flags >> 2) & 3)
        elif op == OP_CANCEL:
            cancel(buf[k + 1])
        else:
            reduce(buf[k + 1], buf[k + 5])


def replay(
    chunks: Iterable[array],
    engine: str = "cython",
    reduce_loses_priority: bool = False,
    fills_out: TextIO | None = None,
) -> ReplayResult:
    """Run parsed chunks through a fresh book; time the matching only; write fills if asked."""
    if engine not in REPLAY_ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {REPLAY_ENGINES}")
    book = make_book("reference" if engine == "reference" else "cython",
                     reduce_loses_priority=reduce_loses_priority)
    batch = engine == "cython"
    seconds = 0.0
    commands = 0
    fills = 0
    for buf in chunks:
        t0 = time.perf_counter()
        if batch:
            book.run_batch(buf)
        else:
            _run_api(book, buf)
        seconds += time.perf_counter() - t0
        commands += len(buf) // STRIDE
        trades = book.take_trades()
        fills += len(trades) // 4
        if fills_out is not None:
            fills_out.writelines(
                f"{trades[i]} {trades[i + 1]} {trades[i + 2]} {trades[i + 3]}\n"
                for i in range(0, len(trades), 4)
            )
    return ReplayResult(commands, seconds, fills)
