"""The garbage-collector policy of a long-running exchange process (the server, its consumers).

CPython's cycle collector runs a young collection every 700 net container allocations and,
every hundred of those, a full one over every tracked object once the heap has grown by a
quarter. An exchange under load allocates containers on every order (core order records,
journal events, tracker states, answers) and keeps many of them (open orders, recent history),
so full collections walk an ever larger heap and come often while it grows: on the websocket
bench (bench/bench_api.py, 100,000 pipelined orders) the server spent about a third of its CPU
in the collector, 30 full collections taking 3.1-3.5 s of an 11.7 s run.

The policy keeps the collector (reference cycles still get freed) but makes it rarer:

- everything alive once start-up is over (the recovered core, the loaded tracker, imported
  modules) is collected once and then frozen into the permanent generation, which no later
  collection walks;
- a young collection waits for 50,000 net allocations instead of 700 (each then takes about
  13 ms), and the older generations keep CPython's ratios between them.

Measured on that bench in one session (quiet machine): default 8,507-8,565 orders/s at 93-94 us
of server CPU per order; this policy 11,541/s at 61 us.
"""

from __future__ import annotations

import gc

YOUNG = 50_000
MIDDLE = 20
OLD = 10


def apply() -> tuple[int, int, int]:
    """Collect and freeze what is alive now, then raise the young generation's threshold; return
    the thresholds it replaced (for :func:`undo`). Call it once start-up is done."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
    return previous


def undo(previous: tuple[int, int, int]) -> None:
    """Back to `previous` thresholds, with the frozen objects collectable again: for a process
    that goes on after its exchange stopped (tests run many in one process), so that what the
    stopped exchange held can be freed."""
    gc.unfreeze()
    gc.set_threshold(*previous)
