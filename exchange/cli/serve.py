"""`carbonx serve`: run the exchange service until SIGTERM or Ctrl-C.

Start-up recovers the core from the journal (with a progress line on stderr when it is long),
settles anything journaled but not yet applied to the registry and ledger, prints the state
digest, and then serves. Until the network API exists, ``--stdio`` takes commands as JSON lines
on stdin and answers each with one JSON line on stdout once it is durable. Commands are
sequenced in the order their lines arrive (later lines do not wait for earlier answers); answers
come as they become durable, so match them by ``id``. A command is a core command (matching/core.py) whose
``account`` is an account code, e.g.::

    {"id": 1, "op": "deposit", "account": "BUY", "amount": 100000, "ref": "bank-7"}
    {"id": 2, "op": "place", "account": "BUY", "symbol": "LQS-FS-2023", "side": 0, "price": 3560, "qty": 1000}
    {"id": 3, "op": "list", "symbol": "LQS-FS-2023", "rules": {"rules": {"always_open": true}}}
    {"id": 4, "op": "digest"}        -> {"id": 4, "seq": ..., "digest": ...}
    {"id": 5, "op": "reconcile"}     -> {"id": 5, "problems": [...]}

Operator commands (list, halt, resume, and cancels without an account) are taken as given: this
channel is for the operator's own tools and tests, not for members.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
import typer

from exchange.cli.common import DataDir, fail, one_line_errors
from exchange.config import load_settings
from exchange.database import prepare_database
from exchange.errors import CarbonxError
from exchange.service import ExchangeService, describe_outcome
from matching.core import Outcome


class _Progress:
    """A one-line progress report on stderr for long recoveries."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total >= 50_000:
            rate = done / max(time.perf_counter() - self.began, 1e-9)
            sys.stderr.write(f"\rrecovering the journal: {done:,}/{total:,} ({100 * done // total}%, {rate:,.0f}/s)")
            self.shown = True
            if done >= total:  # ended here: the start's next messages come before close()
                self.close()
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def _reply(ident: Any, out: Outcome) -> dict[str, Any]:
    return {"id": ident, **describe_outcome(out)}


async def _handle(service: ExchangeService, msg: Any) -> Awaitable[dict[str, Any]] | dict[str, Any]:
    """Sequence one command now, in arrival order; return its answer, or an awaitable of it when
    the answer must wait for durability (so later lines need not wait for this one)."""
    if not isinstance(msg, dict):
        return {"code": "invalid_command", "detail": "each line must be a JSON object"}
    msg = dict(msg)
    ident = msg.pop("id", None)
    try:
        op = msg.get("op")
        if op == "digest":
            # Read now, in order; answer once this state is durable.
            seq, digest = service.core.seq, service.core.state_digest()
            return _after(service.settle(), {"id": ident, "seq": seq, "digest": digest})
        if op == "reconcile":
            return {"id": ident, "problems": await service.reconcile()}
        if isinstance(msg.get("account"), str):
            msg["account"] = await service.account(msg["account"])
        if op == "list":
            return _reply(ident, await service.list_instrument(msg.get("symbol"), msg.get("rules")))
        await service.prepare(msg)
        out, durable = service.apply(msg)
        return _after(durable, _reply(ident, out))
    except CarbonxError as e:
        return {"id": ident, "seq": None, "code": e.code, "detail": e.message}


async def _after(durable: Awaitable[None], answer: dict[str, Any]) -> dict[str, Any]:
    try:
        await durable
    except CarbonxError as e:
        return {"id": answer.get("id"), "seq": None, "code": e.code, "detail": e.message}
    return answer


async def _stdin_lines() -> AsyncIterator[bytes]:
    """Lines of stdin as they come: through the event loop from a pipe, a socket or a terminal,
    in a thread from a regular file (``serve --stdio < commands.jsonl``) or a device such as
    /dev/null, which the loop cannot watch (review27: that start failed unseen and the process
    spun; review28: /dev/null got past the pipe check and was waited on for ever)."""
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()):
        # A regular file, or /dev/null (systemd's StandardInput=null, nohup): epoll refuses both.
        while lines := await asyncio.to_thread(sys.stdin.buffer.readlines, 1 << 20):
            for line in lines:
                yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line


async def _stdio(service: ExchangeService, stop: asyncio.Event) -> None:
    out = sys.stdout.buffer
    pending: set[asyncio.Task] = set()

    def write(reply: dict[str, Any]) -> None:
        out.write(orjson.dumps(reply) + b"\n")
        out.flush()

    async def deliver(answer: Awaitable[dict[str, Any]]) -> None:
        write(await answer)

    async for line in _stdin_lines():
        if stop.is_set():
            break
        if not line.strip():
            continue
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            write({"code": "invalid_json", "detail": "not a JSON line"})
            continue
        answer = await _handle(service, msg)
        if isinstance(answer, dict):
            write(answer)
        else:
            task = asyncio.create_task(deliver(answer))
            pending.add(task)
            task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    stop.set()


async def serve_until_stopped(service: ExchangeService, stdio: bool,
                              ready: Callable[[], None] | None = None) -> str | None:
    """Serve (and read stdin commands with `stdio`) until SIGTERM, Ctrl-C, the end of stdin or
    a failure of the service. `ready` is called once a signal stops it cleanly: a "ready" said
    before that would let an early Ctrl-C end the process with a traceback. Returns what went
    wrong with stdin, if anything did (the caller stops the service first, then says it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    worker = asyncio.create_task(_stdio(service, stop)) if stdio else None
    waiter = asyncio.create_task(stop.wait())
    watch = [waiter] + ([worker] if worker else [])
    while not stop.is_set() and service.failure is None:
        await asyncio.wait(watch, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        if worker is not None and worker.done():
            break  # stdin ended (it set `stop`) or its reader failed: said below, never spun on
    waiter.cancel()
    if worker is not None and not worker.done():
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    elif worker is not None and not worker.cancelled() and worker.exception() is not None:
        return f"reading commands from stdin failed: {worker.exception()!r}"
    return None


async def _serve(data_dir, stdio: bool, snapshot_every: int, flush_ms: float, book: str | None) -> None:
    settings = load_settings(data_dir)
    dsn = await prepare_database(settings)
    progress = _Progress()
    service = ExchangeService(dsn, engine=book, snapshot_every=snapshot_every, flush_interval=flush_ms / 1000,
                              progress=progress)
    began = time.perf_counter()
    await service.start()
    progress.close()
    core = service.core
    where = "DATABASE_URL" if settings.database_url else f"embedded PostgreSQL under {settings.pgdata}"
    typer.echo(f"carbonx exchange: {where}", err=True)
    typer.echo(f"recovered {service.recovered:,} journal entries after the snapshot in "
               f"{time.perf_counter() - began:.2f} s; {len(core.listings)} instruments, "
               f"{len(core.orders):,} open orders", err=True)
    typer.echo(f"state {core.state_digest()} at seq {core.seq}", err=True)
    stdin_failed = await serve_until_stopped(service, stdio, ready=lambda: typer.echo("ready", err=True))
    failure = service.failure
    await service.stop()
    if failure is not None:
        raise CarbonxError("unavailable", f"the exchange stopped: {failure}")
    if stdin_failed is not None:
        raise CarbonxError("stdin_failed", f"{stdin_failed}; the exchange stopped cleanly at seq {service.core.seq}")
    typer.echo(f"stopped cleanly at seq {service.core.seq}", err=True)


def serve(
    data_dir: DataDir = None,
    stdio: Annotated[bool, typer.Option("--stdio", help="Take JSON-line commands on stdin, answer on stdout.")] = False,
    snapshot_every: Annotated[int, typer.Option(min=1, help="Snapshot the core every N journal entries.")] = 250_000,
    flush_ms: Annotated[float, typer.Option(min=0.0, max=100.0, help="Group-commit wait in milliseconds.")] = 0.3,
    book: Annotated[str | None, typer.Option(help="Order book implementation: cython or reference.")] = None,
) -> None:
    """Run the exchange: recover from the journal, then accept commands until stopped."""
    if book not in (None, "cython", "reference"):
        fail(f"unknown book {book!r}; expected cython or reference", "invalid_option")
    with one_line_errors():
        asyncio.run(_serve(data_dir, stdio, snapshot_every, flush_ms, book))
