"""The exchange service: one sequenced core, a group-committed journal, and the projector.

:class:`ExchangeService` owns the only writable :class:`~matching.core.ExchangeCore` of a
database (an advisory lock keeps a second one out). ``submit(command)`` applies the command to
the core at once — asyncio runs one coroutine at a time, so the core sees one total order — and
adds its journal row to the open batch. A flusher task commits the batch (many commands per
transaction, after ``flush_interval`` or ``max_batch`` commands) and only then resolves the
callers' futures: a result, rejections included, reaches its caller only once everything it
depends on is durable. If a commit fails the core is ahead of the journal, so the service stops
and the next start recovers from the journal.

Start-up is: take the lock; rebuild the core from the newest snapshot plus the journal
(exchange/journal.py); bring the registry and ledger up to the journal (exchange/projector.py);
then compare member cash and credits in the database with the core, and journal any difference
made from outside while the service was stopped as an ``adjust`` command, so that replay sees it
too. While the service runs it is the only writer of member cash and credits; the command line
refuses to change them (:func:`refuse_while_serving`).

The projector and the order-history writer follow the durable journal either as tasks on the
service's own event loop (``consumers="task"``, the default) or in a process of their own
(``consumers="process"``, exchange/consumers.py), which the network server uses so that its one
event loop is left to order entry and the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from exchange import history, journal, ledger, projector, registry
from exchange.consumers import DELAY as CONSUMER_DELAY
from exchange.database import connect_consumer, named
from exchange.errors import CarbonxError
from exchange.registry import resolve_issuances
from exchange.text import blank, fits
from matching.core import P_AVAILABLE, P_ENCUMBERED, P_LOCKED, P_LOCKED_DAY, ExchangeCore, Outcome, trading_day
from matching.units import format_cash, format_tonnes

log = logging.getLogger("carbonx.service")


def _to_the_end(method: Callable) -> Callable:
    """A registry change, once begun, runs to its end whatever happens to its caller: a client
    gone, a server's graceful-shutdown timeout or a caller's wait_for cancels only the caller's
    wait. Cancelled half-way, a change could leave the registry and the core apart (a retirement
    made in the registry whose credits the core then gave back, review23); stop() waits for the
    changes under way (each bounded by its own time limits)."""
    @functools.wraps(method)
    async def run(self: ExchangeService, *args: Any, **kwargs: Any) -> Any:
        if not self._running:  # stop() has begun (or start() has not ended): touch nothing
            raise CarbonxError("unavailable", "the exchange service is not running") from self._failure
        if self._stopping:  # stop() waits for the changes under way: a new one would keep it waiting
            raise CarbonxError("unavailable", "the exchange is stopping")
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        self._changes.add(task)
        task.add_done_callback(self._change_done)
        return await asyncio.shield(task)
    return run

SUMMARY_ITEMS = 8  # changes named in adjustment_summary's line; the rest are counted


def adjustment_summary(seq: int | None, cash: list, credits: list, codes: dict[int, str]) -> str:
    """One line, in the API's units, for what an `adjust` took in at start-up: cash per account
    ([account, fen]) and credits per instrument and account ([symbol, account, kg]) changed in the
    database while the service was stopped (payments, issuances or transfers made there)."""
    def signed(n: int, text: str) -> str:
        return ("+" if n > 0 else "-") + text

    items = [f"{codes.get(a, a)} {signed(d, format_cash(abs(d)))} CNY" for a, d in cash]
    items += [f"{codes.get(a, a)} {signed(d, format_tonnes(abs(d)))} t {s}" for s, a, d in credits]
    more = len(items) - SUMMARY_ITEMS
    named = ", ".join(items[:SUMMARY_ITEMS]) + (f" and {more} more" if more > 0 else "")
    return (f"carbonx exchange: took in changes made in the database while the service was not running "
            f"(journal entry {seq}): {named}")


Entry = tuple[int, int, dict, list, history.Folded]

SERVICE_LOCK_KEY = 0x0CA2B1  # pg advisory lock held by the running service for its whole life
# Held by the service through each registry change and until what it journaled is projected;
# `carbonx reconcile` takes it shared to read between changes (exchange/reconcile.py).
REGISTRY_CHANGE_KEY = 0x0CA2B2
# How long the first command of a batch waits for others to join its commit when nothing is queued:
# at least 0.3 ms, until the event loop next wakes (epoll's timeout has millisecond granularity, so
# on an otherwise idle loop it is about 1 ms; with clients sending, their I/O wakes it sooner).
# 0.3 ms, not 1 ms: at 16 REST clients each waiting for its answer, the wait was a quarter of the
# answer time and 1 ms -> 0.3 ms gave 3,453-3,617 -> 3,897-4,060 orders/s (bench_api, alternating
# runs); with a backlog (pipelined websocket orders) there is no wait and it changes nothing.
FLUSH_INTERVAL = 0.0003
EXPIRE = {"op": "expire"}
TIMER_MAX = 1.0  # seconds the timer that applies due expiries and closes sleeps at most
ROLL = {"op": "roll", "cancel_outside_band": True, "tick_floor": True}


def now_us() -> int:
    return time.time_ns() // 1000


def apply_due(core: ExchangeCore, ts: int) -> tuple[tuple[dict, Outcome], ...]:
    """Apply to `core` what time has made due at `ts`; each command with its outcome: expiries
    first (the core takes no other command while one is due, the close among them; an expiry
    trades nothing, so it cannot change a close's price), then the last trading day's close.
    (A tuple, not a generator: this runs before every command, and mostly finds nothing.)"""
    done: tuple[tuple[dict, Outcome], ...] = ()
    if core.expiry_due(ts):
        done = (_apply_due(core, EXPIRE, ts),)
    if core.roll_due(ts):
        done += (_apply_due(core, ROLL, ts),)
    return done


def _apply_due(core: ExchangeCore, command: dict, ts: int) -> tuple[dict, Outcome]:
    # A refusal would be a bug, and must not reach a journal as an entry without a sequence number.
    out = core.apply(command, ts)
    if out.seq is None:
        raise AssertionError(f"the core refused its due {command['op']}: {out.code} {out.detail}")
    return command, out


async def refuse_while_serving(conn: asyncpg.Connection, hold: bool = False) -> None:
    """Raise `service_running` if an exchange service owns this database right now. With `hold`,
    keep the service off it until `conn` closes (or unlocks the shared lock): a command-line
    change checked and then made with the lock let go could be made behind the back of a service
    started meanwhile, which had read the member's cash or credits before it (review27)."""
    free = await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", SERVICE_LOCK_KEY)
    if not free:
        raise CarbonxError("service_running",
                           "the exchange service is running on this database and owns member cash and credits; "
                           "stop it first (or send the change through it)")
    if not hold:
        await conn.execute("SELECT pg_advisory_unlock_shared($1)", SERVICE_LOCK_KEY)


class ExchangeService:
    """The sequenced exchange: submit commands, get durable outcomes."""

    def __init__(
        self, dsn: str, *, engine: str | None = None, flush_interval: float = FLUSH_INTERVAL, max_batch: int = 4096,
        snapshot_every: int = 250_000, journal_method: str = "copy", project: bool = True,
        verify_recovery: bool = True, clock: Callable[[], int] = now_us,
        progress: Callable[[int, int], None] | None = None, consumer_delay: float = CONSUMER_DELAY,
        consumers: str = "task",
    ) -> None:
        if consumers not in ("task", "process"):
            raise ValueError(f"consumers must be 'task' or 'process', not {consumers!r}")
        self.dsn = dsn
        self.engine = engine
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.snapshot_every = snapshot_every
        self.journal_method = journal_method
        self.project = project
        self.verify_recovery = verify_recovery
        self.clock = clock
        self.progress = progress
        self.consumer_delay = consumer_delay  # seconds the projector and history let a small backlog grow
        # Where the projector and the history writer run while serving: tasks on this event loop,
        # or a process of their own (exchange/consumers.py) that leaves this loop to the orders.
        self.consumers = consumers
        self._child: asyncio.subprocess.Process | None = None
        self._child_task: asyncio.Task | None = None
        self.core: ExchangeCore = ExchangeCore(engine)
        self.durable_seq = 0
        self.recovered = 0  # journal entries replayed at start
        self.recovery_seconds = 0.0
        # Called with each committed batch as (seq, ts, command, events, folded) entries, after
        # the orders tracker has folded them: the market-data feed publishes only durable events.
        self.listeners: list[Callable[[list[Entry]], None]] = []
        self.orders = history.OrderTracker()
        # Called with ("issuance" | "retirement", details) once a registry change is committed.
        self.registry_listeners: list[Callable[[str, dict], None]] = []
        self.projected_seq = 0  # how far the registry and ledger follow the journal
        self.history_seq = 0  # how far the history tables follow it
        self._rows: list[journal.Row] = []
        self._entries: list[tuple[int, int, dict, list]] = []
        self._progress = asyncio.Event()  # set whenever a consumer moved on
        self._future: asyncio.Future | None = None
        self._inflight: asyncio.Future | None = None
        # One future per caller rather than a shield around the batch's: cheaper, and a caller
        # that gives up cancels only its own.
        self._waiters: list[asyncio.Future] = []
        self._inflight_waiters: list[asyncio.Future] = []
        self._backlog = False  # rows that waited through the previous commit: flush them at once
        self._wake = asyncio.Event()
        self._timer_wake = asyncio.Event()  # set to end the timer at stop
        self._timer_held = 0  # callers that need the journal to stand still (reconcile)
        self._project_wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._proj: asyncpg.Connection | None = None  # the projector's own connection
        self._hist: asyncpg.Connection | None = None  # the history consumer's
        self._history_wake = asyncio.Event()
        self._history_batches: list[history.Batch] = []  # folded, committed, not yet written
        self._urgent = 0  # callers of caught_up() waiting right now
        self._urgent_event = asyncio.Event()
        self._registry_lock = asyncio.Lock()  # one operator registry change at a time
        self._changes: set[asyncio.Future] = set()  # registry changes under way (_to_the_end)
        self._stopping = False  # stop() has begun: no new registry change
        self._project_hold: int | None = None  # the projector goes no further while a take's change is made
        self._pool: asyncpg.Pool | None = None  # look-ups made while serving requests
        self._tasks: list[asyncio.Task] = []
        self._running = False
        self._closing = False
        self._failure: BaseException | None = None
        self._last_snapshot = 0
        self._accounts: dict[str, tuple[int, str]] = {}

    # ---- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the core from the journal, bring the consumers up to date and start serving.
        A start that fails leaves nothing behind in this process: its tasks, its consumers'
        process, its connections and the service lock are gone, so another service may start
        (a new object: this one keeps what the failed start had loaded)."""
        try:
            await self._start()
        except BaseException:
            await self._abandon()
            raise

    async def _start(self) -> None:
        self._conn = await asyncpg.connect(self.dsn, server_settings=named("journal", self.dsn))
        if not await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", SERVICE_LOCK_KEY):
            # Held exclusively by a service, or shared by command-line changes under way.
            serving = await self._conn.fetchval(
                "SELECT coalesce(bool_or(mode = 'ExclusiveLock'), false) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = 0 AND objid = $1 AND objsubid = 1 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", SERVICE_LOCK_KEY)
            await self._conn.close()
            if serving:
                raise CarbonxError("service_running", "another carbonx exchange service is running on this database")
            raise CarbonxError("service_running", "a command-line change (carbonx cash, registry, demo or clearing) "
                                                  "is under way on this database: start the exchange once it has "
                                                  "finished")
        self._proj = await connect_consumer(self.dsn, "projector")
        self._hist = await connect_consumer(self.dsn, "history")
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4,
                                               server_settings=named("reads", self.dsn))
        began = time.perf_counter()
        self.core = await journal.recover(self._conn, engine=self.engine, verify=self.verify_recovery,
                                          progress=self.progress)
        snap = await journal.latest_snapshot(self._conn)
        self._last_snapshot = snap.seq if snap else 0
        self.recovered = self.core.seq - self._last_snapshot
        self.recovery_seconds = time.perf_counter() - began
        self.durable_seq = self.core.seq
        if self.project:
            await projector.catch_up(self._proj)
            self.projected_seq = self.core.seq
        await history.catch_up(self._hist)
        self.history_seq = self.core.seq
        await self.orders.load(self._hist)
        self._running = True
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="carbonx-journal"))
        if self.consumers == "process":
            await self._start_child()
        else:
            self._tasks.append(asyncio.create_task(self._history_loop(), name="carbonx-history"))
            if self.project:
                self._tasks.append(asyncio.create_task(self._project_loop(), name="carbonx-projector"))
        if self.project:
            await self._adjust_for_outside_changes()
        # Only now: an expiry the timer journaled while the start-up compared the core with the
        # registry would make them differ (credits released in the core, not yet in the registry).
        self._tasks.append(asyncio.create_task(self._timer_loop(), name="carbonx-timer"))

    async def _abandon(self) -> None:
        """Undo a start that failed part-way: nothing it began may outlive it (closing the
        service's own connection releases the advisory lock)."""
        self._running = False
        self._closing = True
        self._timer_wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._child_task is not None:  # first, or it would report the kill as a failure
            self._child_task.cancel()
            await asyncio.gather(self._child_task, return_exceptions=True)
            self._child_task = None
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        for conn in (self._proj, self._hist, self._conn):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        self._proj = self._hist = self._conn = None
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    async def stop(self, snapshot: bool = True) -> None:
        """Finish what was accepted, bring the registry up to date, release the database."""
        if not self._running and not self._tasks:
            return
        self._stopping = True
        while self._changes:  # registry changes under way end first, with the consumers still running
            await asyncio.wait(set(self._changes))  # (gather would cancel them if stop() were cancelled)
        self._running = False
        self._closing = True
        # Let both loops finish what they are doing (a commit, a snapshot, a projection) and exit.
        self._wake.set()
        self._project_wake.set()
        self._history_wake.set()
        self._timer_wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._stop_child()
        if self._failure is None:
            if self.project:
                await projector.catch_up(self._proj)
            await history.catch_up(self._hist)
            if snapshot and self.core.seq > self._last_snapshot:
                await journal.save_snapshot(self._conn, self.core.seq, self.core.state_digest(), self.core.snapshot())
        for conn in (self._proj, self._hist, self._conn):
            if conn is not None and not conn.is_closed():
                await conn.close()
        if self._pool is not None:
            await self._pool.close()

    async def __aenter__(self) -> ExchangeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pool(self) -> asyncpg.Pool:
        """Connections for look-ups while serving (not for changing member cash or credits)."""
        return self._pool

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    # ---- commands ----------------------------------------------------------------------------

    async def submit(self, command: dict) -> Outcome:
        """Apply `command` (a core command dict with account ids) and wait until it is durable."""
        await self.prepare(command)
        out, durable = self.apply(command)
        await durable
        return out

    async def prepare(self, command: dict) -> None:
        """The database look-ups a command needs before it is sequenced (a payment reference
        recorded before the service existed is refused like any duplicate)."""
        if command.get("op") in ("deposit", "withdraw"):
            await self._check_reference_unused(command)
            account, ref = command.get("account"), command.get("ref")
            # A repeated reference is the core's to answer (the payment it made, or a duplicate).
            if type(account) is int and ref not in self.core.payments:
                payee = await self._pool.fetchrow("SELECT code, role FROM accounts WHERE id = $1", account)
                if payee is not None:  # else the core refuses the command
                    ledger.check_payee(payee["code"], payee["role"], command["op"])

    def apply(self, command: dict) -> tuple[Outcome, Awaitable[None]]:
        """Sequence `command` now, synchronously, and return its outcome with an awaitable that
        completes once it (and everything before it) is durable. Callers that must keep their own
        arrival order (a connection's commands) call this in that order and await afterwards."""
        return self._apply(command), self._waiter()

    def apply_shared(self, command: dict) -> tuple[Outcome, asyncio.Future | None]:
        """:meth:`apply` without a future of its own: the future returned is the one of the
        commit the command is in, shared by every command of it (None: durable already). Never
        await it bare (a cancelled awaiter would cancel it for all): add a done callback. For
        callers that answer many commands at once (a websocket connection's pipelined orders)."""
        out = self._apply(command)
        return out, (self._future if self._rows else self._inflight)

    def _apply(self, command: dict) -> Outcome:
        if not self._running:
            raise CarbonxError("unavailable", "the exchange service is not running") from self._failure
        ts = max(self.clock(), self.core.ts)
        self._housekeep(ts)
        out = self.core.apply(command, ts)
        if out.seq is not None:
            self._journal(command, out, ts)
        return out

    def _housekeep(self, ts: int) -> None:
        """Journal what time has made due at `ts` (:func:`apply_due`)."""
        for command, out in apply_due(self.core, ts):
            self._journal(command, out, ts)

    async def _timer_loop(self) -> None:
        """Apply expiries and a day's close when they fall due, not only before the next command:
        on a quiet market an expired order stayed in the book, the feed and its owner's open
        orders (and its cash reserved) until someone sent anything. Matching never depended on
        it: every command applies what is due before itself."""
        while self._running:
            try:
                if not self._timer_held:
                    self._housekeep(max(self.clock(), self.core.ts))
            except Exception:  # a core bug; the next command meets it too, and its caller hears of it
                log.exception("applying what fell due failed")
            due = self.core.next_due()
            # At most TIMER_MAX asleep: the clock may be another's (tests), and an order placed
            # meanwhile may expire sooner. A millisecond late rather than a wake-up too early.
            wait = TIMER_MAX if due is None else min(TIMER_MAX, max(0, due - self.clock()) / 1e6 + 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

    async def _sequence(self, command: dict) -> Outcome:
        out, durable = self.apply(command)
        await durable
        return out

    def _journal(self, command: dict, out: Outcome, ts: int) -> None:
        self._rows.append((out.seq, ts, orjson.dumps(command), orjson.dumps(out.events)))
        self._entries.append((out.seq, ts, command, out.events))
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            self._wake.set()

    def settle(self) -> Awaitable[None]:
        """Completes when everything applied so far is durable."""
        return asyncio.shield(self._settled_future())

    def after_sequenced(self, shared: bool = False) -> Any:
        """What completes once every command sequenced so far is durable, as :meth:`apply` (or,
        `shared`, :meth:`apply_shared`: None when all are durable already) returns it for a
        command: for an answer that depends on them without being sequenced itself."""
        return (self._future if self._rows else self._inflight) if shared else self._waiter()

    def _waiter(self) -> asyncio.Future:
        w = asyncio.get_running_loop().create_future()
        if self._rows:
            self._waiters.append(w)
        elif self._inflight is not None:
            self._inflight_waiters.append(w)
        else:
            w.set_result(None)
        return w

    def _settled_future(self) -> asyncio.Future:
        fut = self._future if self._rows else self._inflight
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
        return fut

    def _change_done(self, task: asyncio.Future) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that was cancelled never will

    @_to_the_end
    async def list_instrument(self, symbol: str, listing: dict | None = None) -> Outcome:
        """List a project vintage; the members' available credits of it come from the registry."""
        # Under the registry lock: an issuance (or retirement, freeze, cancel) between the read and
        # the listing would see the symbol unlisted and leave the core without its change.
        async with self._registry_change():
            holdings = await self._registry_available(symbol) if symbol not in self.core.listings else {}
            listing = dict(listing or {})
            # Its band never narrower than a tick either way (InstrumentRules.tick_floor).
            if isinstance(listing.get("rules") or {}, dict):  # (anything else is the core's to refuse)
                listing["rules"] = {"tick_floor": True, **(listing.get("rules") or {})}
            return await self.submit({"op": "list", "symbol": symbol, "rules": listing,
                                      "holdings": sorted([a, kg] for a, kg in holdings.items() if kg > 0)})

    async def account(self, code: str) -> int:
        """The id of a member account that may trade and hold cash (not a system account)."""
        known = self._accounts.get(code)
        if known is None:
            row = await self._pool.fetchrow("SELECT id, role FROM accounts WHERE code = $1", code)
            if row is None:
                raise CarbonxError("unknown_account", f"no account {code!r}")
            known = self._accounts[code] = (row["id"], row["role"])
        if known[1] == "system":
            raise CarbonxError("forbidden", f"{code} is a system account")
        return known[0]

    async def payment_recorded(self, ref: str) -> tuple[int, str, int] | None:
        """(account, direction, amount in fen) of a payment recorded under `ref` that the core
        does not know (made from the command line while the exchange was stopped, or by the
        demo's set-up; the next start took its cash in as an adjust), or None."""
        if ref in self.core.payments:
            return None
        row = await self._pool.fetchrow(
            "SELECT account_id, direction, amount_fen FROM payments WHERE reference = $1", ref)
        return None if row is None else (row["account_id"], row["direction"], row["amount_fen"])

    async def _check_reference_unused(self, command: dict) -> None:
        """A payment reference recorded before the service existed is refused like any duplicate."""
        ref = command.get("ref")
        if isinstance(ref, str) and ref not in self.core.payments:
            used = await self._pool.fetchval("SELECT 1 FROM payments WHERE reference = $1", ref)
            if used:
                raise CarbonxError("duplicate_reference", f"payment reference {ref!r} was used already")

    # ---- operator and member registry changes while serving ----------------------------------
    #
    # Member credits of a listed instrument live in the core while the service runs, so a change
    # made in the registry must be sequenced too. Changes that take credits away (retire, freeze,
    # cancel) are first tried on paper against the registry (a dry run, which journals nothing
    # when it refuses), then journal an ``adjust`` that takes them from the core (refused if the
    # core cannot spare them), wait until the registry has caught up with that point, and then
    # change the registry; if the registry still refuses (something moved since the dry run), a
    # second ``adjust`` gives them back. Changes that add
    # credits (issue, unfreeze) change the registry first and then journal the ``adjust``. A crash
    # between the two steps leaves the registry and the core apart by exactly that change, which
    # the next start-up finds and journals (:meth:`_adjust_for_outside_changes`).

    @contextlib.asynccontextmanager
    async def _registry_change(self) -> AsyncIterator[None]:
        """One registry change through the service at a time, and, for a reconcile in another
        process, a database lock held until the change and everything it journaled are in the
        registry: a change is two steps (the registry, then an adjust in the journal, or the
        other way round), and a reconcile that read between them reported a difference that
        never existed. (asyncpg's pool unlocks all advisory locks of a connection it gets back.)"""
        async with self._registry_lock, self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", REGISTRY_CHANGE_KEY)
            try:
                yield
            finally:
                with contextlib.suppress(CarbonxError):  # the service stopped: nothing to wait for
                    await self.caught_up(registry=True)
                await conn.execute("SELECT pg_advisory_unlock($1)", REGISTRY_CHANGE_KEY)

    @_to_the_end
    async def issue(self, *, project: str, vintage: int, quantity_kg: int, to_account: str | None = None,
                    reference: str = "") -> registry.Issuance:
        async with self._registry_change():
            async with self._pool.acquire() as conn:
                iss = await registry.issue(conn, project=project, vintage=vintage, quantity_kg=quantity_kg,
                                           to_account=to_account, reference=reference)
            if iss.repeated:  # issued before, with this reference: nothing new to hold or to tell
                return iss
            symbol = f"{iss.project_code}-{iss.vintage}"
            if symbol in self.core.listings:
                await self._sequence({"op": "adjust", "credits": [[symbol, iss.issued_to_account_id, iss.quantity]],
                                      "cause": f"issuance:{iss.id}"})
            self._tell_registry("issuance", {"id": iss.id, "symbol": symbol, "serial": iss.serial,
                                             "quantity_kg": iss.quantity, "account": iss.issued_to_account_id})
            return iss

    @_to_the_end
    async def retire(self, *, account: str, quantity_kg: int, beneficiary: str, purpose: str,
                     symbol: str | None = None, issuance_id: int | None = None,
                     request: tuple[str, bytes] | None = None) -> registry.Retirement:
        """Retire `account`'s credits for a beneficiary. With `request` (idempotency key, digest of
        the request), a repeat returns the retirement the key made (`replayed`) and retires
        nothing; the same key with another digest is refused (`idempotency_key_reused`)."""
        account_id = await self.account(account)
        if type(quantity_kg) is not int or not 0 < quantity_kg < 2**63:  # the registry's bigint
            raise CarbonxError("invalid_quantity", "quantity must be positive and at most 9223372036854775.807 t")
        if not fits(beneficiary, 200):
            raise CarbonxError("invalid_beneficiary", "beneficiary must be 1–200 characters")
        if not fits(purpose, 500):
            raise CarbonxError("invalid_purpose", "purpose must be 1–500 characters")
        async with self._registry_change():  # also orders a key's repeats: the first is recorded before the next looks
            if request is not None:
                found = await self.retirement_by_request(account_id, request)
                if found is not None:
                    return found
            if issuance_id is not None:
                async with self._pool.acquire() as conn:
                    iss = await registry.get_issuance(conn, issuance_id)
                listed = f"{iss.project_code}-{iss.vintage}"
            else:
                code, vintage = registry.split_symbol(symbol or "")
                listed = f"{code}-{vintage}"
            debit = {account_id: quantity_kg} if listed in self.core.listings else {}

            async def change(conn: asyncpg.Connection, dry_run: bool = False) -> registry.Retirement | None:
                return await registry.retire(conn, account=account, quantity_kg=quantity_kg, beneficiary=beneficiary,
                                             purpose=purpose, symbol=symbol, issuance_id=issuance_id, request=request,
                                             dry_run=dry_run)
            ret = await self._take_then_change(listed, debit, change, "retirement", locked_first=True)
            self._tell_registry("retirement", {"id": ret.id, "symbol": listed, "quantity_kg": ret.quantity_kg,
                                               "beneficiary": ret.beneficiary, "purpose": ret.purpose,
                                               "certificate_code": ret.certificate_code,
                                               "serials": list(ret.serials)})
            return ret

    async def retirement_by_request(self, account_id: int, request: tuple[str, bytes]) -> registry.Retirement | None:
        """The retirement made under idempotency key request[0] (`replayed`), None if none was;
        `idempotency_key_reused` if it was made by a request with another digest."""
        async with self._pool.acquire() as conn:
            found = await registry.retirement_by_request(conn, account_id, request[0])
        if found is None:
            return None
        if found[1] != request[1]:
            raise CarbonxError("idempotency_key_reused", f"Idempotency-Key {request[0]!r} was used for another "
                                                         f"request (retirement {found[0].certificate_code})")
        return found[0]

    def _tell_registry(self, kind: str, details: dict) -> None:
        for listener in self.registry_listeners:
            try:
                listener(kind, details)
            except Exception:
                log.exception("a registry listener failed")

    async def freeze(self, *, serial: str, reason: str,
                     request: registry.ChangeRequest | None = None) -> registry.MovementResult:
        return await self._by_serial(serial, reason, registry.freeze, ("available",), take=True, frozen=True,
                                     request=request)

    async def unfreeze(self, *, serial: str, reason: str,
                       request: registry.ChangeRequest | None = None) -> registry.MovementResult:
        return await self._by_serial(serial, reason, registry.unfreeze, ("frozen",), take=False, frozen=True,
                                     request=request)

    async def cancel_serials(self, *, serial: str, reason: str,
                             request: registry.ChangeRequest | None = None) -> registry.MovementResult:
        return await self._by_serial(serial, reason, registry.cancel, ("available",), take=True, request=request)

    @_to_the_end
    async def _by_serial(self, serial: str, reason: str, change: Callable, states: tuple[str, ...],
                         take: bool, frozen: bool = False,
                         request: registry.ChangeRequest | None = None) -> registry.MovementResult:
        """Freeze, unfreeze or cancel a serial range, and take (or give back) in the core what
        it moves of each member's credits. A freeze's take and an unfreeze's give-back are
        marked ``frozen`` (core adjust): an unfreeze on the day of the freeze gives back locked
        what the freeze took of that day's purchases, so they stay unsellable until the next (T+1).
        With `request` (operator account, idempotency key, digest), a repeat of a change made
        returns what it moved (`replayed`) and changes nothing, the core included."""
        if blank(reason or ""):
            raise CarbonxError("invalid_reason", "say why: the registry's history shows the reason")
        async with self._registry_change():  # also orders a key's repeats: the first is recorded before the next looks
            if request is not None:
                async with self._pool.acquire() as conn:
                    found = await registry.change_by_request(conn, request)
                if found is not None:
                    return found
            # The registry as of now: what the range holds per member is what the core gives or takes.
            await self.caught_up(registry=True)
            async with self._pool.acquire() as conn:
                iss, rng = await registry.resolve_serial(conn, serial)
                rows = await conn.fetch(
                    """SELECT b.owner_account_id AS account,
                              sum(upper(b.serials * int8range($2, $3)) - lower(b.serials * int8range($2, $3)))::bigint
                              AS kg
                       FROM blocks b JOIN accounts a ON a.id = b.owner_account_id
                       WHERE b.issuance_id = $1 AND b.serials && int8range($2, $3) AND b.state = ANY($4::text[])
                         AND a.role <> 'system'
                       GROUP BY 1""", iss.id, rng.lo, rng.hi, list(states))
            symbol = f"{iss.project_code}-{iss.vintage}"
            moved = {r["account"]: r["kg"] for r in rows} if symbol in self.core.listings else {}

            async def apply_change(conn: asyncpg.Connection, dry_run: bool = False) -> registry.MovementResult:
                if dry_run:
                    return await change(conn, serial=serial, reason=reason, dry_run=True)
                async with conn.transaction():
                    result = await change(conn, serial=serial, reason=reason, request=request)
                    # Orders settled since the range was read (a release, a delivery) may have put
                    # other credits in it or taken some out: the core would then have been told
                    # another amount than the registry moved, and the two would disagree for good.
                    if symbol in self.core.listings and await _members_moved(conn, result, states) != moved:
                        raise CarbonxError("busy", "the credits in that serial range changed hands while it was "
                                                   "being changed (an order or a trade being settled); nothing was "
                                                   "changed: try again")
                    return result
            if take:
                result = await self._take_then_change(symbol, moved, apply_change, "operator", frozen=frozen)
                await self._cap_frozen_locked(symbol, result)
                return result
            async with self._pool.acquire() as conn:
                result = await apply_change(conn)
            if moved:
                await self._sequence({"op": "adjust", "credits": [[symbol, a, kg] for a, kg in sorted(moved.items())],
                                      "cause": "operator", **({"frozen": True} if frozen else {})})
            return result

    async def _cap_frozen_locked(self, symbol: str, result: registry.MovementResult) -> None:
        """After a cancel took frozen credits: tell the core what is still frozen of each member's
        credits that it remembers a freeze took of the day's purchase, so that it never relocks
        more than that (review28: a later same-day unfreeze locked credits not bought that day).
        Only when there is something to cap; a crash before it leaves the excess until the roll."""
        if not any(p.from_state == "frozen" and (symbol, p.from_owner) in self.core.frozen_locked
                   for p in result.pieces):
            return
        async with self._pool.acquire() as conn:
            owners = [a for a in sorted(await _members_moved(conn, result, ("frozen",)))
                      if (symbol, a) in self.core.frozen_locked]
            left = (await registry_positions(conn, symbol, states=("frozen",)))["frozen"]
        try:
            await self._sequence({"op": "adjust", "frozen_left": [[symbol, a, left.get(a, 0)] for a in owners],
                                  "cause": "operator"})
        except CarbonxError:  # stopping: the cancel is made, and the excess is dropped at the day's roll
            log.warning("what a cancel left frozen could not be told to the core (the exchange is stopping)")

    async def _rolled_back(self, xid: int, cause: str) -> bool:
        """After a change failed other than by a refusal: whether its transaction `xid` is known to
        have been rolled back (the credits taken for it go back then). The server may still be
        finishing it (a COMMIT under way when the connection went): asked again until it has
        ended, for up to 10 s. When that cannot be told, the credits stay taken and it is logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                status = await self._pool.fetchval("SELECT txid_status($1)", xid)
            except Exception:
                status = None
            if status in ("aborted", "committed"):
                return status == "aborted"
            if status != "in progress" or loop.time() > deadline:
                log.error("a registry change (%s) failed after its credits were taken from the core, and whether "
                          "the registry made it cannot be told: the core keeps them taken until the next start "
                          "compares it with the registry", cause)
                return False
            await asyncio.sleep(0.05)

    def _check_spare(self, symbol: str, debit: dict[int, int]) -> None:
        """Refuse a take of `debit` (kg per account) of `symbol` that the core cannot spare: only
        available credits and those bought today (locked) can be taken, not those in sell orders."""
        positions = self.core.credits[symbol]
        for account, kg in debit.items():
            pos = positions.get(account, [0, 0, 0, 0])
            if pos[P_AVAILABLE] + pos[P_LOCKED] < kg:
                raise CarbonxError("insufficient_credits",
                                   f"needs {kg} kg of {symbol} available, has {pos[P_AVAILABLE] + pos[P_LOCKED]}"
                                   " (credits in open sell orders are encumbered)")

    async def _take_then_change(self, symbol: str, debit: dict[int, int], change: Callable, cause: str,
                                locked_first: bool = False, frozen: bool = False) -> Any:
        """Take `debit` (kg per account) of `symbol` from the core, then make the registry `change`
        (called as change(conn) and, to check it first, change(conn, dry_run=True)); give the
        credits back if the registry refuses. `frozen`: the take is into a freeze (core adjust)."""
        mark = {"frozen": True} if frozen else {}
        if not debit:
            async with self._pool.acquire() as conn:
                return await change(conn)
        self._check_spare(symbol, debit)
        # What the registry refuses as it stands (part of the range frozen, encumbered or
        # retired; the member's credits in another issuance than the one named) is refused here,
        # before the take: a refusal then leaves the journal as it was, and no order is refused
        # meanwhile for credits taken and given back. Only a change refused for what moved since
        # this look still takes and gives back. The registry is first brought up to the core, or
        # it could refuse credits that a trade has just delivered.
        await self.caught_up(registry=True)
        async with self._pool.acquire() as conn:
            await change(conn, dry_run=True)
        # Again, with nothing awaited between it and the take: a sell accepted meanwhile may
        # have encumbered the credits, and the core's adjust takes whatever it is told to.
        self._check_spare(symbol, debit)
        positions = self.core.credits[symbol]
        # The take comes from available credits first, then from those bought today (the
        # core's adjust), or the other way round (`locked_first`: a retirement may use what
        # cannot be sold today, and an offset retires the tonnes it just bought; it used to
        # take the member's older, sellable ones). A give-back puts each part back where it
        # was, or a refused retirement would free today's purchases (T+1). What came from the
        # locked part is read off the position around the take itself, applied at once:
        # an expiry journaled just before it (housekeeping) frees credits, never locked ones.
        locked = {a: positions.get(a, [0, 0, 0, 0])[P_LOCKED] for a in debit}
        takes = [[symbol, a, -kg, kg] if locked_first else [symbol, a, -kg] for a, kg in sorted(debit.items())]
        out, durable = self.apply({"op": "adjust", "credits": takes, "cause": cause, "take": True, **mark})
        back = [[symbol, a, kg, locked[a] - positions.get(a, [0, 0, 0, 0])[P_LOCKED]]
                for a, kg in sorted(debit.items())]
        # Until the registry has changed, the projector goes no further than the take: a sell
        # accepted meanwhile would be encumbered, in the registry, on the lowest serials, which
        # may be the very range being frozen (still available there), and the freeze refused.
        self._project_hold = out.seq
        self._tell_child(f"hold {out.seq}")
        xid: int | None = None
        give_back = False
        try:
            await durable
            await self.caught_up(out.seq, registry=True)
            async with self._pool.acquire() as conn, conn.transaction():
                # The change's transaction by its id, which PostgreSQL can be asked about later.
                xid = await conn.fetchval("SELECT txid_current()")
                if out.seq in self.core.locked_takes:
                    # With the change or not at all: a start after a crash gives back, locked,
                    # the bought-today credits of a take without its change (_end_takes_not_made).
                    await conn.execute("INSERT INTO registry_takes_made (seq) VALUES ($1)", out.seq)
                return await change(conn)
        except CarbonxError:
            give_back = True  # refused (its transaction rolled back), or never asked
            raise
        except BaseException:
            # Not a refusal: a lost connection or a statement timeout, perhaps while committing,
            # or a cancel. Given back although made, the credits would be the core's again and
            # their next settlement would fail in the registry; kept although not made, the core
            # holds less than the registry until the next start compares the two and adjusts.
            # So they go back only when the registry was never asked, or its transaction is
            # known to have been rolled back (a look at the registry's holdings right away once
            # saw a commit still under way as not made: review25).
            give_back = xid is None or await self._rolled_back(xid, cause)
            raise
        finally:
            self._project_hold = None
            self._project_wake.set()
            self._tell_child("release")
            if give_back:
                try:
                    await self._sequence({"op": "adjust", "credits": back, "cause": f"{cause} refused",
                                          "gives_back": out.seq, **mark})
                except CarbonxError:
                    log.error("credits taken for a refused registry change (%s) could not be given back (the "
                              "exchange is stopping); the next start compares the core with the registry", cause)

    # ---- background work ---------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        conn = self._conn
        try:
            while True:
                if not self._rows:
                    if self._closing:
                        return
                    # Cleared only here, with nothing to write: cleared with a batch taken, a
                    # stop() that woke the writer during the gathering sleep below was lost.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self.flush_interval and len(self._rows) < self.max_batch and not self._backlog:
                    await asyncio.sleep(self.flush_interval)  # let more commands join this commit
                    if not self._rows:  # a failure elsewhere (a consumer's) dropped them meanwhile
                        continue
                rows, fut, entries = self._rows, self._future, self._entries
                self._rows, self._future, self._entries = [], None, []
                waiters, self._waiters = self._waiters, []
                self._inflight_waiters = waiters
                self._inflight = fut
                snap = None
                if rows[-1][0] - self._last_snapshot >= self.snapshot_every:
                    snap = (rows[-1][0], self.core.state_digest(), self.core.snapshot())
                try:
                    async with conn.transaction():
                        await journal.append(conn, rows, self.journal_method)
                except BaseException as exc:
                    self._fail(exc, fut)
                    raise
                self.durable_seq = rows[-1][0]
                self._inflight = None
                self._inflight_waiters = []
                self._backlog = bool(self._rows)
                # Fold and publish before any caller resumes: an answer may then read the
                # tracker, and the feed never shows an event after the answer that caused it.
                folded = self.orders.apply_commit(entries)
                published = [(*entry, f) for entry, f in zip(entries, folded, strict=True)]
                if self._child is None:
                    self._queue_history(published)
                else:
                    self._tell_child(str(self.durable_seq))
                for listener in self.listeners:
                    try:
                        listener(published)
                    except Exception:  # a broken subscriber must not stop the exchange
                        log.exception("a journal listener failed")
                if not fut.done():  # a failure elsewhere during the commit has told its callers
                    fut.set_result(None)
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
                self._project_wake.set()
                self._history_wake.set()
                if snap is not None:
                    await journal.save_snapshot(conn, *snap)
                    self._last_snapshot = snap[0]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("journal writer failed; the service stops")
            self._fail(exc, None)

    async def _project_loop(self) -> None:
        try:
            while not self._closing:
                await self._project_wake.wait()
                await self._gather(lambda: self.durable_seq - self.projected_seq)
                self._project_wake.clear()
                upto = self._projectable()
                if upto <= self.projected_seq:  # held at a take: nothing to do (nor progress to tell)
                    continue
                await projector.catch_up(self._proj, upto=upto)
                self.projected_seq = max(self.projected_seq, upto)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("projecting the journal into the registry and ledger failed; the service stops")
            self._fail(exc, None)

    async def _gather(self, backlog: Callable[[], int]) -> None:
        """Let a small backlog grow for `consumer_delay` before applying it: each apply costs a few
        database round trips whatever its size, so at low rates this spends them on many entries
        at once. Nobody waits for it unless they ask (:meth:`caught_up` cuts the wait short)."""
        if self.consumer_delay and not self._urgent and not self._closing and backlog() < 1000:
            self._urgent_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent_event.wait(), self.consumer_delay)

    def _queue_history(self, published: list[Entry]) -> None:
        """Hand the tracker's folding of a committed batch to the history writer, as records taken
        now (the live order objects go on changing)."""
        touched: dict[int, history.OrderState] = {}
        fills: list[history.Fill] = []
        trades: list[history.Trade] = []
        for *_, folded in published:
            if folded.orders:
                touched.update(folded.orders)
                fills.extend(folded.fills)
                trades.extend(folded.trades)
        self._history_batches.append(history.Batch(
            published[0][0], published[-1][0], {oid: history.order_record(o) for oid, o in touched.items()},
            fills, trades))

    async def _history_loop(self) -> None:
        try:
            while not self._closing or self._history_batches:
                await self._history_wake.wait()
                await self._gather(lambda: self.durable_seq - self.history_seq)
                self._history_wake.clear()
                batches, self._history_batches = self._history_batches, []
                if not batches:
                    continue
                await history.write_folded(self._hist, batches)
                self.history_seq = max(self.history_seq, batches[-1].last)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("projecting the journal into the order history failed; the service stops")
            self._fail(exc, None)

    # ---- the consumers' process ---------------------------------------------------------------

    async def _start_child(self) -> None:
        args = [sys.executable, "-m", "exchange.consumers", "--delay", str(self.consumer_delay)]
        if not self.project:
            args.append("--no-project")
        # The DSN goes in the environment, not the command line that every local user can read
        # (it may hold a password). stderr is inherited: a consumer's failure is logged where the
        # service's own logs go. A session of its own: Ctrl-C in a terminal signals the whole
        # foreground group, and the child takes its orders from us (stop, or the end of its
        # input when we die), never from the terminal; it used to die of the Ctrl-C first, and
        # the service reported its consumers as failed while it was stopping cleanly.
        self._child = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CARBONX_CONSUMERS_DSN": self.dsn}, start_new_session=True)
        line = await asyncio.wait_for(self._child.stdout.readline(), 60)
        if line.strip() != b"ready":
            code = await self._child.wait()
            self._child = None
            raise RuntimeError(f"the journal consumers process did not start (exit status {code})")
        self._child_task = asyncio.create_task(self._child_reports(self._child), name="carbonx-consumers")

    def _projectable(self) -> int:
        """How far the projector may apply the journal: what is durable, or less while a take's
        registry change is being made (the consumers' process is told `hold SEQ` and `release`)."""
        hold = self._project_hold
        return self.durable_seq if hold is None else min(self.durable_seq, hold)

    def _tell_child(self, line: str) -> None:
        child = self._child
        if child is not None and child.returncode is None and not child.stdin.is_closing():
            child.stdin.write(line.encode() + b"\n")

    async def _child_reports(self, child: asyncio.subprocess.Process) -> None:
        """Follow the child's positions; its end before we asked for it stops the service."""
        while line := await child.stdout.readline():
            name, _, seq = line.decode().partition(" ")
            if name == "projector":
                self.projected_seq = max(self.projected_seq, int(seq))
            elif name == "history":
                self.history_seq = max(self.history_seq, int(seq))
            self._progress.set()
        code = await child.wait()
        if not self._closing or code != 0:
            log.error("the journal consumers process ended (exit status %s); the service stops", code)
            self._fail(RuntimeError(f"the journal consumers process ended with status {code}"), None)

    async def _stop_child(self) -> None:
        """Let the child apply everything journaled, then end it (and never leave it behind)."""
        child, self._child = self._child, None
        if child is None:
            return
        if child.returncode is None:
            with contextlib.suppress(ConnectionError):
                child.stdin.write(f"{self.durable_seq}\nstop\n".encode())
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 120)
            except TimeoutError:
                log.error("the journal consumers process did not stop in time; killing it")
                child.kill()
                await child.wait()
        task, self._child_task = self._child_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def caught_up(self, seq: int | None = None, *, registry: bool = False, orders: bool = False,
                        timeout: float = 30.0) -> None:
        """Wait until the registry and ledger (`registry`) and/or the history tables (`orders`)
        reflect the journal up to `seq` (default: everything applied so far)."""
        if seq is None:
            await self.settle()
            seq = self.core.seq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (registry and self.project and self.projected_seq < seq) or (orders and self.history_seq < seq):
            if self._failure is not None:
                raise CarbonxError("unavailable", f"the exchange stopped: {self._failure}")
            if self._closing:  # its consumers have stopped: nothing will come
                raise CarbonxError("unavailable", "the exchange is stopping")
            left = deadline - loop.time()
            if left <= 0:
                raise CarbonxError("unavailable", "the registry did not catch up with the exchange in time")
            self._progress.clear()
            self._project_wake.set()
            self._history_wake.set()
            self._tell_child("hurry")
            self._urgent += 1
            self._urgent_event.set()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), min(left, 0.05))
            finally:
                self._urgent -= 1

    def _fail(self, exc: BaseException, fut: asyncio.Future | None) -> None:
        self._failure = self._failure or exc
        self._running = False
        self._closing = True
        self._wake.set()
        self._project_wake.set()
        self._history_wake.set()
        self._progress.set()
        for f in (fut, self._future, self._inflight, *self._waiters, *self._inflight_waiters):
            if f is not None and not f.done():
                f.set_exception(CarbonxError("unavailable", f"the journal could not be written: {exc}"))
                f.exception()  # mark retrieved: the callers hear it through their await
        self._future = self._inflight = None
        self._waiters, self._inflight_waiters = [], []
        self._rows = []
        self._entries = []

    # ---- database views used at start-up -----------------------------------------------------

    async def _registry_available(self, symbol: str) -> dict[int, int]:
        return (await registry_positions(self._pool, symbol))["available"]

    async def _adjust_for_outside_changes(self) -> None:
        # First what fell due while stopped (a GTD buy that expired overnight frees the cash a
        # payout made meanwhile may have taken), projected, so that the registry's encumbrances
        # agree with the core's again before the two are compared.
        self._housekeep(max(self.clock(), self.core.ts))
        await self.caught_up(registry=True)
        await self._end_takes_not_made()
        await self._relock_unfrozen_while_away()
        cash, credits = await outside_changes(self._pool, self.core)
        # Cash paid out while stopped that open buy orders had reserved (the command line checks,
        # a hand-made change may not): taking it in would let those orders trade with money that
        # is gone, and the trade's settlement could never be posted. Nothing is journaled.
        short = [(a, d, *self.core.cash[a]) for a, d in cash if a in self.core.cash
                 and self.core.cash[a][0] + d < self.core.cash[a][1]]
        if short:
            codes = dict(await self._pool.fetch("SELECT id, code FROM accounts WHERE id = ANY($1::bigint[])",
                                                [a for a, *_ in short]))
            raise CarbonxError("reserved_cash_withdrawn", "; ".join(
                f"{codes.get(a, a)}: {format_cash(-d)} CNY left while the exchange was stopped, leaving "
                f"{format_cash(bal + d)} CNY against {format_cash(held)} CNY its open buy orders reserve"
                for a, d, bal, held in short) + "; deposit the difference (carbonx cash deposit) and start again")
        credits, frozen, frozen_left = await self._taken_into_freezes(credits)
        if frozen:
            out = await self._sequence({"op": "adjust", "credits": frozen, "frozen": True, "frozen_left": frozen_left,
                                        "cause": "frozen while stopped"})
            log.warning("credits bought today left the members' available credits while the exchange was stopped, "
                        "and the members have frozen credits: taken at %d as frozen, so that an unfreeze today "
                        "gives them back locked (T+1): %s", out.seq, frozen)
        if cash or credits:
            out = await self._sequence({"op": "adjust", "cash": cash, "credits": credits})
            ids = sorted({a for a, _ in cash} | {a for _, a, _ in credits})
            codes = {r["id"]: r["code"] for r in await self._pool.fetch(
                "SELECT id, code FROM accounts WHERE id = ANY($1::bigint[])", ids)}
            log.warning("%s", adjustment_summary(out.seq, cash, credits, codes))

    async def _taken_into_freezes(self, credits: list) -> tuple[list, list, list]:
        """Split the start's credit changes ([[symbol, account, delta]]) into (the rest, takes
        into a freeze, frozen_left). A take is counted into a freeze when it reaches into the
        member's purchases of today and the member now has frozen credits of that symbol: most
        likely a freeze made while the exchange was stopped. It is taken marked frozen (core
        adjust), the memory capped at what is frozen, so that an unfreeze later that day gives it
        back locked (T+1) as it would a freeze made while running; taken unmarked, it came back
        sellable. A retirement made while stopped beside older frozen credits is counted too:
        that can only keep credits locked until the next day, never make any sellable early."""
        today = trading_day(max(self.clock(), self.core.ts))
        reaching: dict[str, list[list]] = {}
        for entry in credits:
            symbol, account, delta = entry
            pos = self.core.credits[symbol].get(account)
            if delta < 0 and pos is not None and -delta > pos[P_AVAILABLE] and pos[P_LOCKED] \
                    and pos[P_LOCKED_DAY] >= today:
                reaching.setdefault(symbol, []).append(entry)
        into: list[list] = []
        left: list[list] = []
        for symbol, entries in reaching.items():
            frozen = (await registry_positions(self._pool, symbol, states=("frozen",)))["frozen"]
            for entry in entries:
                if frozen.get(entry[1], 0) > 0:
                    into.append(entry)
                    left.append([symbol, entry[1], frozen[entry[1]]])
        return [x for x in credits if x not in into], into, left

    async def _end_takes_not_made(self) -> None:
        """Give back, locked, what a take of the day's purchases took for a registry change that
        was never made (a crash between the two, or a give-back that could not be journaled):
        the comparison with the registry that follows would give it back sellable (T+1)."""
        if not self.core.locked_takes:
            return
        made = {r["seq"] for r in await self._pool.fetch(
            "SELECT seq FROM registry_takes_made WHERE seq = ANY($1::bigint[])", sorted(self.core.locked_takes))}
        for seq, (_, frozen, took) in sorted(self.core.locked_takes.items()):
            if seq not in made:
                out = await self._sequence({"op": "adjust", "credits": took, "cause": "registry change not made",
                                            "gives_back": seq, **({"frozen": True} if frozen else {})})
                log.warning("entry %d took credits for a registry change that was not made: given back at %d "
                            "(those bought today locked, T+1)", seq, out.seq)

    async def _relock_unfrozen_while_away(self) -> None:
        """Relock what left a freeze unseen by the core of the day's purchases it remembers frozen
        (an unfreeze made while stopped, or a crash between an unfreeze and its give-back): fewer
        kg are frozen in the registry than it remembers, and the member's available credits
        grew. As much of that growth as the frozen kg fell short comes back locked, as the
        unfreeze's own give-back would have brought it; the memory is capped at what is frozen."""
        today = trading_day(max(self.clock(), self.core.ts))
        by_symbol: dict[str, list[tuple[int, int]]] = {}
        for (symbol, account), (day, kg) in sorted(self.core.frozen_locked.items()):
            if day >= today:
                by_symbol.setdefault(symbol, []).append((account, kg))
        for symbol, held in by_symbol.items():
            db = await registry_positions(self._pool, symbol, states=("available", "frozen"))
            positions = self.core.credits[symbol]
            credits, left = [], []
            for account, kg in held:
                frozen = db["frozen"].get(account, 0)
                if frozen >= kg:
                    continue
                pos = positions.get(account, [0, 0, 0, 0])
                grew = db["available"].get(account, 0) - pos[P_AVAILABLE] - pos[P_LOCKED]
                if grew > 0:
                    credits.append([symbol, account, grew, min(grew, kg - frozen)])
                left.append([symbol, account, frozen])
            if left:
                out = await self._sequence({"op": "adjust", "credits": credits, "frozen_left": left, "frozen": True,
                                            "cause": "unfrozen while stopped"})
                log.warning("%s: frozen credits bought today left the freeze while the exchange was stopped; "
                            "given back locked at %d (T+1)", symbol, out.seq)

    # ---- checks ------------------------------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Core invariants plus registry and ledger against the core (after projecting all)."""
        # The timer waits meanwhile: an expiry or a close it journaled between the wait below and
        # the comparison would set a core one entry ahead against a registry one behind.
        self._timer_held += 1
        try:
            async with self._registry_lock:  # between registry changes, never inside one
                await asyncio.shield(self._settled_future())
                problems = self.core.check_invariants()
                if not self.project:
                    return problems
                # Orders go on arriving: compare a copy of the core as of now, brought to the
                # projector's position in the snapshot the registry and ledger are read in (the
                # live core, compared after the wait, was ahead of them).
                core = ExchangeCore.restore(self.core.snapshot(), self.engine)
                await self.caught_up(core.seq, registry=True)
                async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                           readonly=True):
                    position = await projector.position(conn)
                    while core.seq < position:
                        journal.apply_rows(core, await journal.read(conn, core.seq, journal.READ_CHUNK, position))
                    problems.extend(await compare_with_database(conn, core))
                return problems
        finally:
            self._timer_held -= 1


async def _members_moved(conn: asyncpg.Connection, result: registry.MovementResult,
                         states: tuple[str, ...]) -> dict[int, int]:
    """kg a registry change moved out of `states`, per member (system accounts are not in the core)."""
    out: dict[int, int] = {}
    for p in result.pieces:
        if p.from_state in states:
            out[p.from_owner] = out.get(p.from_owner, 0) + p.size
    if out:
        system = {r["id"] for r in await conn.fetch("SELECT id FROM accounts WHERE role = 'system' AND id = ANY($1)",
                                                    list(out))}
        out = {a: kg for a, kg in out.items() if a not in system}
    return out


async def member_balances(conn: asyncpg.Connection | asyncpg.Pool) -> dict[int, int]:
    """Every member account's ledger balance in fen (system accounts left out)."""
    rows = await conn.fetch(
        """SELECT a.id, coalesce(b.balance_fen, 0) AS balance FROM accounts a
           LEFT JOIN cash_balances b ON b.account_id = a.id WHERE a.role <> 'system'""")
    return {r["id"]: r["balance"] for r in rows}


async def registry_positions(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, members_only: bool = True,
                             states: tuple[str, ...] = ("available", "encumbered")) -> dict[str, dict[int, int]]:
    """kg of `symbol` per account in each of `states` (empty when nothing is issued)."""
    out: dict[str, dict[int, int]] = {state: {} for state in states}
    try:
        ids = await resolve_issuances(conn, symbol=symbol)
    except CarbonxError:
        return out
    rows = await conn.fetch(
        """SELECT b.owner_account_id AS account, b.state, sum(upper(b.serials) - lower(b.serials))::bigint AS kg
           FROM blocks b JOIN accounts a ON a.id = b.owner_account_id
           WHERE b.issuance_id = ANY($1::bigint[]) AND b.state = ANY($3::text[])
             AND (a.role <> 'system' OR NOT $2)
           GROUP BY 1, 2""", list(ids), members_only, list(states))
    for r in rows:
        out[r["state"]][r["account"]] = r["kg"]
    return out


async def outside_changes(conn: asyncpg.Connection | asyncpg.Pool, core: ExchangeCore) -> tuple[list, list]:
    """The cash and available credits the database holds that `core` (the journal) does not: the
    changes made while the exchange was stopped (the command line), which the next start takes
    in as an ``adjust`` (cash [[account, delta]], credits [[symbol, account, delta]]). Encumbered
    credits only ever change through orders: a difference there is `registry_mismatch`."""
    db_cash = await member_balances(conn)
    cash = [[a, db_cash.get(a, 0) - core.cash.get(a, [0, 0])[0]] for a in sorted(set(db_cash) | set(core.cash))]
    credits = []
    for symbol in sorted(core.listings):
        db = await registry_positions(conn, symbol)
        positions = core.credits[symbol]
        for account in sorted(set(db["available"]) | set(db["encumbered"]) | set(positions)):
            pos = positions.get(account, [0, 0, 0, 0])
            if db["encumbered"].get(account, 0) != pos[P_ENCUMBERED]:
                raise CarbonxError(
                    "registry_mismatch",
                    f"{symbol}: account {account} has {db['encumbered'].get(account, 0)} kg encumbered in the "
                    f"registry but {pos[P_ENCUMBERED]} kg in open sell orders; run `carbonx reconcile`")
            delta = db["available"].get(account, 0) - pos[P_AVAILABLE] - pos[P_LOCKED]
            if delta:
                credits.append([symbol, account, delta])
    return [x for x in cash if x[1]], credits


async def compare_with_database(conn: asyncpg.Connection, core: ExchangeCore, seq: int | None = None) -> list[str]:
    """Where the registry's encumbered and available credits or the ledger's member balances differ
    from the core (the projector must have caught up with the core's sequence number, or `seq`)."""
    problems: list[str] = []
    at = await projector.position(conn)
    if at != (core.seq if seq is None else seq):
        problems.append(f"projector at {at}, core at {core.seq if seq is None else seq}")
    for account, balance in (await member_balances(conn)).items():
        mine = core.cash.get(account, [0, 0])[0]
        if mine != balance:
            problems.append(f"account {account}: ledger balance {balance}, core {mine}")
    for symbol in sorted(core.listings):
        held = await registry_positions(conn, symbol, members_only=False)
        db = {(account, state): kg for state, by_account in held.items() for account, kg in by_account.items()}
        accounts = set(core.credits[symbol]) | {a for a, _ in db}
        for account in sorted(accounts):
            pos = core.credits[symbol].get(account, [0, 0, 0, 0])
            if db.get((account, "encumbered"), 0) != pos[P_ENCUMBERED]:
                problems.append(f"{symbol} account {account}: registry encumbered "
                                f"{db.get((account, 'encumbered'), 0)}, open sells {pos[P_ENCUMBERED]}")
            if db.get((account, "available"), 0) != pos[P_AVAILABLE] + pos[P_LOCKED]:
                problems.append(f"{symbol} account {account}: registry available "
                                f"{db.get((account, 'available'), 0)}, core {pos[P_AVAILABLE] + pos[P_LOCKED]}")
    return problems


def describe_outcome(out: Outcome) -> dict[str, Any]:
    """A JSON-ready view of an outcome (for the command line and logs)."""
    return {
        "seq": out.seq, "code": out.code, "detail": out.detail or None, "order_id": out.order_id,
        "duplicate": out.duplicate, "events": [list(e) for e in out.events],
    }

