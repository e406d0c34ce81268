"""Deterministic generators of replay streams (the text format of matching/replay.py).

Two workloads, each fully determined by (commands, seed):

- ``exchange-core``: modelled on exchange-core's published benchmark mix — GTC 12%, IOC 2%,
  FOK 0.1%, cancel 7%, move 72%, reduce 7% — around ~1,000 resting orders, where about 2% of
  commands trade (IOC/FOK take liquidity; GTC orders and moves are placed on their own side of the
  spread so they rest);
- ``simple``: 60% GTC adds of which 1 in 8 crosses the spread, 30% cancels, 10% IOC, around
  ~10,000 resting orders.

To pick live orders and place prices relative to the spread the generator keeps an oracle book
(the Cython book through its per-command API) and feeds it every command it emits. The oracle
only steers choices; the stream is then a plain text file any engine can replay. Aggressive order
sizes adapt to how far the resting count is from the target, which keeps the book near its size.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator

from matching.book import make_book
from matching.events import OP_CANCEL, OP_MOVE, OP_REDUCE, OP_SUBMIT
from matching.replay import STRIDE, format_command

WORKLOADS = ("exchange-core", "simple")

_GTC, _IOC, _FOK = 0, 1, 2


class _Gen:
    def __init__(self, seed: int, target: int, users: int, spread_ticks: int, engine: str) -> None:
        self.r = random.Random(seed)
        self.book = make_book(engine)
        self.live: list[int] = []
        self.next_id = 1
        self.target = target
        self.users = users
        self.spread = spread_ticks
        self.mid = 100_000
        self.avg_qty = 20

    # The oracle decides liveness; dead ids are dropped lazily when drawn.
    def pick(self) -> tuple | None:
        live, book = self.live, self.book
        for _ in range(8):
            if not live:
                return None
            k = self.r.randrange(len(live))
            o = book.order(live[k])
            if o is not None:
                return o
            live[k] = live[-1]
            live.pop()
        return None

    def best(self, side: int) -> int:
        b = self.book.best_bid() if side == 0 else self.book.best_ask()
        if b is None:
            b = self.mid - 1 if side == 0 else self.mid + 1
        return b

    def passive_price(self, side: int) -> int:
        """A price on `side` that does not cross: behind the opposite best by 1..spread ticks."""
        off = 1 + int(self.r.expovariate(1.0 / self.spread))
        if side == 0:
            return max(1, self.best(1) - off)
        return self.best(0) + off

    def aggressive(self, side: int) -> tuple[int, int]:
        """Price through the opposite best and a size that eats more when the book is large."""
        price = self.best(1) + self.r.randint(0, 3) if side == 0 else self.best(0) - self.r.randint(0, 3)
        pressure = max(0.5, len(self.live) / self.target)
        qty = 1 + int(self.r.random() * 2 * self.avg_qty * pressure * pressure)
        return max(1, price), qty

    def qty(self) -> int:
        return 1 + int(self.r.expovariate(1.0 / self.avg_qty))

    def emit(self, cmd: tuple[int, ...]) -> tuple[int, ...]:
        op = cmd[0]
        b = self.book
        if op == OP_SUBMIT:
            b.submit(cmd[1], cmd[2], cmd[3] & 3, cmd[4], cmd[5], (cmd[3] >> 2) & 3)
        elif op == OP_MOVE:
            b.move(cmd[1], cmd[4])
        elif op == OP_CANCEL:
            b.cancel(cmd[1])
        else:
            b.reduce(cmd[1], cmd[5])
        b.clear_events()
        return cmd

    def add(self, side: int, tif: int, price: int, qty: int) -> tuple[int, ...]:
        oid = self.next_id
        self.next_id += 1
        if tif == _GTC:
            self.live.append(oid)
        uid = self.r.randrange(1, self.users + 1)
        return self.emit((OP_SUBMIT, oid, uid, side | tif << 2, price, qty, 0, 0))

    def new_gtc(self) -> tuple[int, ...]:
        side = self.r.randrange(2)
        return self.add(side, _GTC, self.passive_price(side), self.qty())

    def cancel(self) -> tuple[int, ...]:
        o = self.pick()
        if o is None:
            return self.new_gtc()
        return self.emit((OP_CANCEL, o[0], o[1], 0, 0, 0, 0, 0))


def _exchange_core(g: _Gen) -> tuple[int, ...]:
    x = g.r.random() * 1000
    if x < 120 or len(g.live) < g.target // 4:
        return g.new_gtc()
    if x < 140:
        side = g.r.randrange(2)
        return g.add(side, _IOC, *g.aggressive(side))
    if x < 141:
        side = g.r.randrange(2)
        return g.add(side, _FOK, *g.aggressive(side))
    if x < 211:
        return g.cancel()
    o = g.pick()
    if o is None:
        return g.new_gtc()
    oid, uid, side, price, qty = o[0], o[1], o[2], o[3], o[4]
    if x < 281:
        by = g.r.randint(1, qty - 1) if qty > 1 else 1
        return g.emit((OP_REDUCE, oid, uid, 0, 0, by, 0, 0))
    # Move: a small step that stays on the order's own side of the spread.
    step = g.r.randint(-g.spread // 2 - 1, g.spread // 2 + 1)
    new = price + step
    new = min(new, g.best(1) - 1) if side == 0 else max(new, g.best(0) + 1)
    return g.emit((OP_MOVE, oid, uid, 0, max(1, new), 0, 0, 0))


def _simple(g: _Gen) -> tuple[int, ...]:
    x = g.r.random() * 100
    if x < 60:
        side = g.r.randrange(2)
        if g.r.randrange(8) == 0:
            return g.add(side, _GTC, *g.aggressive(side))
        return g.add(side, _GTC, g.passive_price(side), g.qty())
    if x < 90:
        return g.cancel()
    side = g.r.randrange(2)
    return g.add(side, _IOC, *g.aggressive(side))


def generate(workload: str, commands: int, seed: int = 1, engine: str = "cython") -> Iterator[tuple]:
    """Yield `commands` commands (run_batch tuples) of the named workload."""
    if workload == "exchange-core":
        g = _Gen(seed, target=1000, users=1000, spread_ticks=12, engine=engine)
        step = _exchange_core
    elif workload == "simple":
        g = _Gen(seed, target=10_000, users=2000, spread_ticks=200, engine=engine)
        step = _simple
    else:
        raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
    for _ in range(commands):
        yield step(g)


def generate_batch(workload: str, commands: int, seed: int = 1) -> array:
    """The whole stream as one run_batch buffer (8 int64 per command)."""
    buf = array("q")
    for cmd in generate(workload, commands, seed):
        buf.extend(cmd)
    return buf


def write_stream(path: str, workload: str, commands: int, seed: int = 1) -> None:
    """Write the stream as text, one command a line."""
    with open(path, "w") as f:
        f.writelines(format_command(cmd) + "\n" for cmd in generate(workload, commands, seed))


def chunks_of(buf: array, chunk: int) -> list[array]:
    """Split a run_batch buffer into buffers of at most `chunk` commands."""
    n = chunk * STRIDE
    return [buf[i : i + n] for i in range(0, len(buf), n)]
