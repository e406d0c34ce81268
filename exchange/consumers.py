"""The journal consumers in a process of their own: the projector (registry and cash ledger) and
the order-history writer follow the journal beside a serving exchange instead of inside it.

Both only read the journal and write their own tables with their position in the same
transaction (exchange/projector.py, exchange/history.py), so where they run changes nothing they
write. Inside the serving process they took a fifth to a quarter of its one event loop (py-spy
on the network bench); here they use the machine's other core and leave the loop to order entry.

The parent (:class:`ExchangeService` with ``consumers="process"``) talks over pipes, one line per
message:

- parent to child, on stdin: ``<seq>`` (the journal is durable up to seq), ``hurry`` (someone
  waits: apply the backlog now rather than letting it grow for ``--delay``), ``hold <seq>`` and
  ``release`` (the projector goes no further than seq until released: a registry change is
  being made at that point; order history goes on), ``stop`` (apply everything announced, then
  exit). End of input — the parent died, even by SIGKILL — means stop.
- child to parent, on stdout: ``ready`` once connected, then ``projector <seq>`` and ``history <seq>``
  each time one of them has committed its position.

Errors go to stderr and end the process with a non-zero status; the parent then stops serving,
as it does when a consumer fails in process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from exchange import gcpolicy, history, projector
from exchange.database import connect_consumer

log = logging.getLogger("carbonx.consumers")
BACKLOG_NOW = 1000  # entries that are applied at once, without waiting for more
# Seconds a small backlog may gather. Each apply has a fixed cost (a transaction of a dozen
# statements and their per-statement checks: some 3.5 ms of CPU for the projector), so at a
# light load the consumers' CPU is mostly that: at 100 orders/s they took 27 % of a core with
# 10 ms and 16 % with 50 ms (the network bench's fan-out run, /proc schedstat). Settlement then
# trails by up to 50 ms; anyone who waits for it (caught_up) hurries it instead.
DELAY = 0.05


class Consumers:
    """Follows announced journal positions with the projector and the history writer."""

    def __init__(self, dsn: str, *, delay: float, say: Callable[[str], None]) -> None:
        self.dsn = dsn
        self.delay = delay
        self.say = say
        self.durable = 0
        self.hold: int | None = None  # the projector's limit while a registry change is made
        self.stopping = False
        self.wake = {"projector": asyncio.Event(), "history": asyncio.Event()}
        # One per consumer: a hurry is spent by the apply that covers what was announced before
        # it, and one consumer's apply must not spend the other's.
        self.hurry = {"projector": asyncio.Event(), "history": asyncio.Event()}

    def hurry_up(self) -> None:
        """Someone waits for what has been announced: apply it without gathering more."""
        for e in self.hurry.values():
            e.set()

    def announce(self, seq: int) -> None:
        self.durable = max(self.durable, seq)
        for e in self.wake.values():
            e.set()

    def hold_at(self, seq: int | None) -> None:
        self.hold = seq
        self.wake["projector"].set()

    def limit(self, name: str) -> int:
        """How far consumer `name` may go: what is durable, less for the projector while held."""
        if name == "projector" and self.hold is not None and not self.stopping:
            return min(self.durable, self.hold)
        return self.durable

    def stop(self) -> None:
        self.stopping = True
        self.hurry_up()
        for e in self.wake.values():
            e.set()

    async def follow(self, name: str, apply: Callable[..., Awaitable[int]]) -> None:
        """Apply the journal up to each announced position, letting small backlogs gather."""
        conn = await connect_consumer(self.dsn, name)
        try:
            done = await projector.position(conn, name)
            wake, hurry = self.wake[name], self.hurry[name]
            while True:
                await wake.wait()
                wake.clear()
                if self.limit(name) <= done:
                    if self.stopping and self.durable <= done:
                        return
                    continue
                if self.delay and not self.stopping and self.limit(name) - done < BACKLOG_NOW and not hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(hurry.wait(), self.delay)
                # Spent here, with no await before reading the position: the parent announces a
                # position before it hurries for it, so this apply covers what the hurry was for.
                # (Clearing it before the gathering lost a hurry read together with its position:
                # every caught_up then waited the whole delay.)
                hurry.clear()
                upto = self.limit(name)
                await apply(conn, upto=upto)
                done = upto
                self.say(f"{name} {done}")
                wake.set()  # look again: more may have been announced meanwhile
        finally:
            await conn.close()


async def run(dsn: str, delay: float, project: bool) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def say(line: str) -> None:
        try:
            out.write(line + "\n")
            out.flush()
        except BrokenPipeError:  # the parent is gone: nobody to tell, the work goes on to the end
            c.stop()

    c = Consumers(dsn, delay=delay, say=say)
    tasks = [asyncio.create_task(c.follow("history", history.catch_up))]
    if project:
        tasks.append(asyncio.create_task(c.follow("projector", projector.catch_up)))
    gcpolicy.apply()
    say("ready")

    async def listen() -> None:
        while line := (await reader.readline()).strip():
            if line == b"stop":
                break
            if line == b"hurry":
                c.hurry_up()
            elif line.startswith(b"hold "):
                c.hold_at(int(line[5:]))
            elif line == b"release":
                c.hold_at(None)
            else:
                c.announce(int(line))
        c.stop()

    listener = asyncio.create_task(listen())
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    listener.cancel()
    for t in tasks:
        if t.done() and t.exception() is not None:
            # End now, without unwinding the other consumer: the server rolls back whatever
            # transaction it had open, and its position says where to start again.
            log.error("a journal consumer failed", exc_info=t.exception())
            logging.shutdown()
            os._exit(1)
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exchange.consumers", description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("CARBONX_CONSUMERS_DSN"),
                   help="the database (default: $CARBONX_CONSUMERS_DSN, which keeps a password off the command line)")
    p.add_argument("--delay", type=float, default=DELAY, help="seconds a small backlog may gather")
    p.add_argument("--no-project", dest="project", action="store_false", help="history only")
    args = p.parse_args(argv)
    if not args.dsn:
        p.error("no database: give --dsn or set CARBONX_CONSUMERS_DSN")
    logging.basicConfig(level=logging.WARNING, format="carbonx consumers: %(message)s")
    try:
        asyncio.run(run(args.dsn, args.delay, args.project))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
