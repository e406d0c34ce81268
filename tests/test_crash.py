"""Crash tests: `carbonx serve --stdio` killed with SIGKILL at random moments under load.

A real subprocess takes a pipelined, seeded random mix of deposits, withdrawals, limit, IOC and
market orders, cancels and amends from three members, and is killed with SIGKILL after a random
delay (or right after a burst is written, or while it is still recovering at start-up), then
started again, over and over. After every restart the test proves, from the outside:

- durability of answers: every command answered as accepted is in the journal under the answered
  sequence number, with the same command and byte-for-byte the same events;
- atomicity of the group commit: the journal is exactly 1..max with no gap, and the restarted
  service's digest equals both a clean replay of the whole journal and a replay from the newest
  snapshot, so nothing was half-applied or applied without being journaled;
- the registry and ledger follow the journal exactly once: ``reconcile`` finds no problem, every
  journaled trade is in ``settled_trades`` exactly once with the same amounts, postings sum to
  zero and match the balances, every payment is recorded once, blocks cover every issuance, and no
  restart had to journal an ``adjust`` (the database never drifted from the core);
- nothing else is in the journal: each entry nobody got an answer for is a command written to the
  process that journaled it and not answered (none rejected, none invented);
- what the answers said about orders survives: an order the answers closed is not open, and an
  order the answers left open is open with the same price and remaining quantity when nothing
  unanswered touched it (no unanswered command could cross, cancel or amend it, or none of the
  unanswered journal entries above names it); otherwise, unless an unanswered amend named it, its
  open quantity can only have gone down;
- cash and credits are conserved in the recovered core.

A "round" is the life of one process. Each kill is counted; the tests assert that kills really
happened with commands in flight (written to the process but not answered), or, at start-up,
before the process said ``ready``, and print how many kill points ran (26 in the passing tests,
plus at least one in the expected failure).

The load is seeded (20240607, or CRASH_SEED); the kill moments, and what the process had done by
then, are not reproducible, which is the point. test_digest_answers_name_durable_states is an
expected failure: a ``digest`` answered under load can name a sequence number that a crash then
loses (see its reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import orjson
import pytest

from exchange import ledger, registry
from exchange.accounts import create_account
from exchange.journal import apply_rows, latest_snapshot, read, recover
from exchange.service import SERVICE_LOCK_KEY
from matching.core import (
    O_ACCOUNT,
    O_PRICE,
    O_REMAINING,
    O_SIDE,
    P_AVAILABLE,
    P_ENCUMBERED,
    P_LOCKED,
    ExchangeCore,
)
from tests.registry_helpers import cover_violations, world

SYMBOL = "FOREST-2023"
LISTING = {"rules": {"always_open": True}, "maker_bp": 5, "taker_bp": 10, "t1": False}
MEMBERS = ("DEV", "BUY", "MM")
CREDITS_T = {"DEV": 100, "BUY": 40, "MM": 60}  # tonnes of FOREST-2023 each member holds at listing
SEED_CASH = {"DEV": 5_000_000, "BUY": 20_000_000, "MM": 10_000_000}  # fen, deposited before the first start
APP = "carbonx-crash-test"  # the service's application_name in pg_stat_activity, bare or with its job ("... journal")
WINDOW = 256  # at most this many commands written and not yet answered
BID, ASK, LIMIT, MARKET, IOC = 0, 1, 0, 1, 1
EV_ACCEPTED, EV_TRADE, EV_CANCELLED, EV_EXPIRED, EV_AMENDED = 1, 3, 4, 5, 6
EV_DEPOSIT, EV_WITHDRAWAL, EV_CASH_ADJUSTED = 20, 21, 33
EXPECTED_REJECTIONS = {"insufficient_funds", "insufficient_credits", "not_found"}  # what the load can cause
UNCERTAIN = {"unavailable"}  # an answer that does not say whether the command took effect

TOTALS: Counter = Counter()  # across the file: kill points and checks, printed at the end of each test


# ---- the history of one test: every command written and every answer read -------------------------


@dataclass
class Order:
    """What the answers say about one order, in sequence order."""

    account: int
    side: int
    remaining: int
    round: int  # the process that placed it
    price: int
    prices: set[int]  # every price it had
    open: bool = True
    cancelled: bool = False  # closed by a cancel (for good), not only filled as far as the answers tell


@dataclass
class History:
    ids: dict[str, int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 0
    sent: dict[int, tuple[int, dict]] = field(default_factory=dict)  # id -> (round, command as written)
    answers: dict[int, dict] = field(default_factory=dict)
    live: dict[int, list] = field(default_factory=dict)  # the writer's view: id -> [code, side, price, open qty]

    def new_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def codes(self) -> dict[int, str]:
        return {v: k for k, v in self.ids.items()}

    def note_answer(self, answer: dict) -> None:
        """Keep the writer's rough view of open orders (in arrival order; only used to pick targets)."""
        codes = self.codes()
        with self.lock:
            self.answers[answer["id"]] = answer
            live = self.live
            for ev in answer.get("events") or ():
                if ev[0] == EV_ACCEPTED and ev[5]:
                    live[ev[2]] = [codes[ev[3]], ev[4], ev[5], ev[6]]
                elif ev[0] in (EV_CANCELLED, EV_EXPIRED):
                    live.pop(ev[2], None)
                elif ev[0] == EV_AMENDED and ev[2] in live:
                    live[ev[2]][2:] = ev[3:5]
                elif ev[0] == EV_TRADE:
                    for oid in (ev[3], ev[4]):
                        if oid in live:
                            live[oid][3] -= ev[9]
                            if live[oid][3] <= 0:
                                del live[oid]

    def acked(self) -> list[tuple[int, dict, dict]]:
        """(seq, command, answer) of every command answered as accepted, in sequence order."""
        out = []
        for ident, answer in self.answers.items():
            _, msg = self.sent[ident]
            if msg["op"] not in ("digest", "reconcile") and answer.get("seq") is not None:
                out.append((answer["seq"], msg, answer))
        return sorted(out, key=lambda x: x[0])

    def unanswered(self) -> dict[int, list[dict]]:
        """Commands that may or may not have taken effect, by round."""
        out: dict[int, list[dict]] = {}
        for ident, (rnd, msg) in self.sent.items():
            answer = self.answers.get(ident)
            if answer is None or answer.get("code") in UNCERTAIN:
                out.setdefault(rnd, []).append(msg)
        return out


# ---- one server process ----------------------------------------------------------------------------


class Server:
    """`carbonx serve --stdio` in a subprocess; a thread reads its answers, another its stderr."""

    def __init__(self, dsn: str, data_dir: str, history: History, rnd: int, snapshot_every: int,
                 flush_ms: float) -> None:
        env = {k: v for k, v in os.environ.items() if k != "CARBONX_DATA_DIR"}
        env["DATABASE_URL"] = dsn + ("&" if "?" in dsn else "?") + f"application_name={APP}"
        self.history = history
        self.round = rnd
        self.snapshot_every = snapshot_every
        self.cond = threading.Condition()
        self.sent = 0
        self.answered = 0
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.began = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exchange", "serve", "--stdio", "--snapshot-every", str(snapshot_every),
             "--flush-ms", str(flush_ms), "--data-dir", data_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._threads = [threading.Thread(target=self._read_answers, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_answers(self) -> None:
        for line in self.proc.stdout:
            if not line.endswith(b"\n"):
                break  # cut short by the kill: never a whole answer
            answer = orjson.loads(line)
            self.history.note_answer(answer)
            with self.cond:
                self.answered += 1
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            self.stderr.append(text)
            if text == "ready":
                self.ready.set()
        with self.cond:
            self.cond.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def inflight(self) -> int:
        return self.sent - self.answered

    def wait_ready(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if not self.alive or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server did not start (exit {self.proc.returncode}):\n" + "\n".join(self.stderr))
        return time.perf_counter() - self.began

    def send(self, msg: dict, flush: bool = True) -> bool:
        """Write one command line; False once the process is gone. Recorded as sent before writing."""
        with self.history.lock:
            self.history.sent[msg["id"]] = (self.round, msg)
        try:
            self.proc.stdin.write(orjson.dumps(msg) + b"\n")
            if flush:
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        with self.cond:
            self.sent += 1
        return True

    def request(self, msg: dict, timeout: float = 60) -> dict:
        msg = {"id": self.history.new_id(), **msg}
        assert self.send(msg), "server went away"
        deadline = time.monotonic() + timeout
        with self.cond:
            while msg["id"] not in self.history.answers:
                assert self.alive, "server died:\n" + "\n".join(self.stderr)
                assert time.monotonic() < deadline, f"no answer to {msg}"
                self.cond.wait(0.05)
        return self.history.answers[msg["id"]]

    def kill(self) -> None:
        """SIGKILL, then read every answer it managed to write before dying."""
        if self.proc.returncode is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(10)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()


# ---- the random load -------------------------------------------------------------------------------


class Load:
    """A seeded random mix of member commands, with unique payment references."""

    def __init__(self, history: History, rng: random.Random, digests: float = 0.0) -> None:
        self.history = history
        self.rng = rng
        self.digests = digests  # the share of `digest` requests mixed in

    def command(self) -> dict:
        rng, h = self.rng, self.history
        ident = h.new_id()
        if self.digests and rng.random() < self.digests:
            return {"id": ident, "op": "digest"}
        account = rng.choice(MEMBERS)
        r = rng.random()
        with h.lock:
            live = list(h.live.items()) if r < 0.36 else []
        if r < 0.06:
            return {"id": ident, "op": "deposit", "account": account, "amount": rng.randint(1, 100) * 10_000,
                    "ref": f"dep-{ident}"}
        if r < 0.10:
            return {"id": ident, "op": "withdraw", "account": account, "amount": rng.randint(1, 40) * 5_000,
                    "ref": f"wd-{ident}"}
        if r < 0.36 and live:
            oid, (code, _, price, _) = rng.choice(live)
            if r < 0.25:
                return {"id": ident, "op": "cancel", "account": code, "order_id": oid}
            return {"id": ident, "op": "amend", "account": code, "order_id": oid,
                    "price": max(3000, price + rng.randint(-4, 4) * 5), "qty": rng.randint(1, 5) * 1000}
        side = rng.randint(BID, ASK)
        qty = rng.randint(1, 5) * 1000
        order = {"id": ident, "op": "place", "account": account, "symbol": SYMBOL, "side": side, "qty": qty}
        if r < 0.44:
            order["kind"] = MARKET
            if side == BID:
                order["cash_cap"] = qty * rng.randint(30, 40) // 10  # fen: 3000–4000 fen/t
            return order
        order["price"] = 3500 + (rng.randint(-30, 10) if side == BID else rng.randint(-10, 30)) * 5
        if r < 0.54:
            order["tif"] = IOC
        return order


# ---- the harness: starts, loads, kills and checks ----------------------------------------------------


@dataclass
class Kill:
    kind: str  # load, burst or startup
    round: int
    sent: int
    answered: int
    ready: bool  # the process had said "ready" before the kill
    phase: str = ""  # startup kills: what its database sessions were doing


class Harness:
    def __init__(self, dsn: str, data_dir: str, run, seed: int) -> None:
        self.dsn = dsn
        self.data_dir = data_dir
        self.run = run
        self.seed = seed
        self.rng = random.Random(seed)
        self.servers: list[Server] = []
        self.kills: list[Kill] = []
        self.rounds = 0
        self.shadow = ExchangeCore()  # a clean replay of the journal, advanced by check_digest_answers
        self.journal_at_spawn: list[int] = []  # journal length when each process was started
        self.stats: Counter = Counter()
        self.conn: asyncpg.Connection = run(asyncpg.connect(dsn))
        self.history = History(ids={})
        self.history.ids.update(run(self._prepare()))

    async def _prepare(self) -> dict[str, int]:
        conn = self.conn
        await world(conn, tonnes=CREDITS_T["DEV"])
        await create_account(conn, "MM", "Market maker", "enterprise")
        for code in ("BUY", "MM"):
            await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=CREDITS_T[code] * 1000,
                                 to_account=code)
        for code, fen in SEED_CASH.items():
            await ledger.deposit(conn, account=code, amount_fen=fen, reference=f"seed-{code}")
        rows = await conn.fetch("SELECT code, id FROM accounts WHERE code = ANY($1::text[])", list(MEMBERS))
        return {r["code"]: r["id"] for r in rows}

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        self.run(self.conn.close())

    # ---- processes ---------------------------------------------------------------------------

    async def _service_sessions(self) -> list:
        return await self.conn.fetch(
            """SELECT pid, state, query, application_name FROM pg_stat_activity
               WHERE (application_name = $1 OR application_name LIKE $1 || ' %')
                 AND datname = current_database()""", APP)

    async def _wait_sessions_gone(self) -> None:
        deadline = time.monotonic() + 20
        while await self._service_sessions():
            assert time.monotonic() < deadline, "the killed service's sessions did not end"
            await asyncio.sleep(0.005)

    def spawn(self, snapshot_every: int | None = None) -> Server:
        """A new server process (after the previous one's database sessions have ended)."""
        self.run(self._wait_sessions_gone())
        end, projected = self.run(self.conn.fetchrow(
            """SELECT (SELECT count(*) FROM journal),
                      coalesce((SELECT seq FROM journal_consumers WHERE name = 'projector'), 0)"""))
        self.journal_at_spawn.append(end)
        if end > projected:  # the start-up has to settle entries the killed process had not projected
            self.stats["restarts_projector_behind"] += 1
            self.stats["projector_behind_max"] = max(self.stats["projector_behind_max"], end - projected)
        if snapshot_every is None:
            snapshot_every = self.rng.choice([120, 300, 1_000_000])
        self.rounds += 1
        server = Server(self.dsn, self.data_dir, self.history, self.rounds, snapshot_every,
                        self.rng.choice([0.0, 1.0, 1.0, 4.0]))
        self.servers.append(server)
        return server

    def start(self, snapshot_every: int | None = None) -> Server:
        server = self.spawn(snapshot_every)
        self.stats["start_ms_max"] = max(self.stats["start_ms_max"], int(1000 * server.wait_ready()))
        # The next spawn waits for these sessions to end before it counts the journal; if they could
        # not be seen, a killed process's last commit could land after the count, in the wrong round.
        names = {r["application_name"] for r in self.run(self._service_sessions())}
        assert f"{APP} journal" in names, names
        return server

    def first_start(self) -> Server:
        server = self.start()
        answer = server.request({"op": "list", "symbol": SYMBOL, "rules": LISTING})
        assert answer["code"] is None and answer["seq"] == 2, answer  # 1 is the adjust for the seed deposits
        return server

    def _kill(self, server: Server, kind: str, phase: str = "", then=None) -> Kill:
        ready = server.ready.is_set()
        server.proc.kill()
        if then is not None:
            then()
        server.kill()
        kill = Kill(kind, server.round, server.sent, server.answered, ready, phase)
        self.kills.append(kill)
        TOTALS[f"kills_{kind}"] += 1
        return kill

    # ---- rounds --------------------------------------------------------------------------------

    def load_and_kill(self, server: Server, seconds: float, digests: float = 0.0) -> Kill:
        """Pipelined random load for `seconds`, then SIGKILL while commands are in flight."""
        load = Load(self.history, random.Random(self.rng.random()), digests)
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                with server.cond:
                    while server.inflight() >= WINDOW and server.alive and not stop.is_set():
                        server.cond.wait(0.05)
                if stop.is_set() or not server.send(load.command()):
                    return

        def stop_writer() -> None:
            stop.set()
            thread.join(10)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(seconds)
        try:
            return self._kill(server, "load", then=stop_writer)
        finally:
            stop_writer()

    def burst_and_kill(self, server: Server, n: int, delay: float) -> Kill:
        """Write `n` commands as fast as the pipe takes them and kill `delay` s after the last one,
        without reading a single answer in between."""
        load = Load(self.history, random.Random(self.rng.random()))
        for i in range(n):
            if not server.send(load.command(), flush=i == n - 1):
                break
        if delay:
            time.sleep(delay)
        return self._kill(server, "burst", f"{1000 * delay:.0f} ms after the burst")

    def kill_during_startup(self, max_delay: float = 0.1) -> Kill:
        """Start a server and kill it within `max_delay` s of its taking the service lock."""
        server = self.spawn()
        delay = self.rng.uniform(0, max_delay)

        async def locked_then_wait() -> str:
            deadline = time.monotonic() + 30
            while not await self.conn.fetchval(
                    """SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                       WHERE l.locktype = 'advisory' AND l.objid::bigint = $1 AND l.granted
                         AND d.datname = current_database()""", SERVICE_LOCK_KEY):
                assert server.alive and time.monotonic() < deadline, "\n".join(server.stderr)
                await asyncio.sleep(0.002)
            await asyncio.sleep(delay)
            sessions = await self._service_sessions()
            busy = [r["query"][:40] for r in sessions if r["state"] == "active"]
            return (f"{1000 * delay:.0f} ms after the lock, {'ready' if server.ready.is_set() else 'starting'}, "
                    f"{len(sessions)} sessions, " + ("; ".join(busy) or "no query running"))

        phase = self.run(locked_then_wait())
        return self._kill(server, "startup", phase)

    # ---- the checks after a restart ------------------------------------------------------------

    def check(self, server: Server) -> None:
        recon = server.request({"op": "reconcile"})
        assert recon["problems"] == [], recon
        digest = server.request({"op": "digest"})
        self.run(self._check_database(digest))
        self.stats["checks"] += 1
        TOTALS["checks"] += 1

    def check_digest_answers(self, rnd: int) -> int:
        """Every digest answered by process `rnd` names a journal position whose clean replay has that digest."""
        answers = sorted((a["seq"], a["digest"]) for i, a in self.history.answers.items()
                         if self.history.sent[i][0] == rnd and self.history.sent[i][1]["op"] == "digest")

        async def replay() -> None:
            end = await self.conn.fetchval("SELECT count(*) FROM journal")
            core = self.shadow
            for seq, digest in answers:
                assert seq <= end, f"a digest was answered at seq {seq}, but the journal ends at {end} after the kill"
                assert seq >= core.seq
                while core.seq < seq:
                    apply_rows(core, await read(self.conn, core.seq, 5000, seq))
                assert core.state_digest() == digest, f"the digest answered at {seq} is not the journal's"

        self.run(replay())
        return len(answers)

    def _expected_command(self, msg: dict) -> dict:
        cmd = {k: v for k, v in msg.items() if k != "id"}
        if "account" in cmd:
            cmd["account"] = self.history.ids[cmd["account"]]
        if cmd["op"] == "list":  # the service lists with a band a tick either way at least (tick_floor)
            cmd["rules"] = {**cmd["rules"], "rules": {"tick_floor": True, **cmd["rules"].get("rules", {})}}
        return cmd

    async def _check_database(self, digest: dict) -> None:
        conn, h = self.conn, self.history
        rows = await conn.fetch("SELECT seq, command, events FROM journal ORDER BY seq")
        end = len(rows)
        assert [r["seq"] for r in rows] == list(range(1, end + 1)), "the journal has a gap"
        assert digest["seq"] == end, (digest, end)
        commands = [orjson.loads(r["command"]) for r in rows]
        events = [orjson.loads(r["events"]) for r in rows]

        # Every accepted answer is durable: same seq, same command, same events.
        acked = h.acked()
        seqs = Counter(seq for seq, _, _ in acked)
        assert not [s for s, n in seqs.items() if n > 1], "two answers with one seq"
        for seq, msg, answer in acked:
            assert answer["code"] is None, answer
            assert seq <= end, f"answered seq {seq} ({msg}) is not in the journal (ends at {end})"
            if msg["op"] == "list":
                got = commands[seq - 1]
                assert {k: got[k] for k in ("op", "symbol", "rules")} == self._expected_command(msg)
                assert got["holdings"] == sorted([h.ids[c], t * 1000] for c, t in CREDITS_T.items())
            else:
                assert commands[seq - 1] == self._expected_command(msg), (seq, msg)
            assert events[seq - 1] == answer["events"], (seq, msg)
        rejected = Counter(a["code"] for i, a in h.answers.items()
                           if a.get("seq") is None and h.sent[i][1]["op"] not in ("digest", "reconcile"))
        assert set(rejected) <= EXPECTED_REJECTIONS, rejected
        self.stats["acked"], self.stats["rejected"] = len(acked), sum(rejected.values())
        TOTALS["journal_entries_checked"] += end
        assert [i for i, c in enumerate(commands) if c["op"] == "adjust"] == [0], "a restart had to adjust"

        # Every journal entry nobody got an answer for is a command written, and not answered, to the
        # process that journaled it: nothing rejected, nothing invented, nothing from another life.
        answered = set(seqs)
        unacked_touch: set[int] = set()  # orders that such entries mention
        unanswered = self.history.unanswered()
        for rnd in range(1, self.rounds + 1):
            first = self.journal_at_spawn[rnd - 1] + 1
            last = self.journal_at_spawn[rnd] if rnd < self.rounds else end
            pending = Counter(orjson.dumps(self._expected_command(m), option=orjson.OPT_SORT_KEYS)
                              for m in unanswered.get(rnd, ()))
            for seq in range(max(first, 3), last + 1):
                if seq in answered:
                    continue
                key = orjson.dumps(commands[seq - 1], option=orjson.OPT_SORT_KEYS)
                assert pending[key] > 0, f"journal entry {seq} {commands[seq - 1]} was not an unanswered command"
                pending[key] -= 1
                for ev in events[seq - 1]:
                    if ev[0] in (EV_ACCEPTED, EV_CANCELLED, EV_EXPIRED, EV_AMENDED):
                        unacked_touch.add(ev[2])
                    elif ev[0] == EV_TRADE:
                        unacked_touch.update(ev[3:5])

        # Clean replay of the whole journal, and recovery from the newest snapshot, give the digest.
        clean = await recover(conn, use_snapshot=False, upto=digest["seq"])
        assert clean.state_digest() == digest["digest"], "the restarted service differs from a clean replay"
        core = await recover(conn, upto=digest["seq"])
        assert core.state_digest() == digest["digest"], "recovery from the snapshot differs"
        snap = await latest_snapshot(conn, digest["seq"])
        if snap is not None and snap.seq > 2:
            self.stats["checks_from_snapshot"] += 1
        assert clean.check_invariants() == []
        self._check_orders(acked, core, unacked_touch)
        self._check_conservation(core, events)
        await self._check_projection(events, end)

    def _check_orders(self, acked: list, core, unacked_touch: set[int]) -> None:
        """Claims about orders that follow from the answers, checked against the recovered core.

        An order's state after its last answered event is exact if no unanswered command can have
        touched it: either none could by its nature (a cancel or amend of it, or an order that could
        cross it), or none that made it into the journal did (those were matched to commands sent).
        Otherwise only what can be bounded is claimed: closed stays closed, and without an amend the
        open quantity can only have gone down.
        """
        orders: dict[int, Order] = {}
        for _, msg, answer in acked:
            rnd = self.history.sent[msg["id"]][0]
            for ev in answer["events"]:
                kind, oid = ev[0], ev[2] if len(ev) > 2 else None
                if kind == EV_ACCEPTED:
                    orders[oid] = Order(ev[3], ev[4], ev[6], rnd, ev[5], {ev[5]})
                elif kind == EV_TRADE:
                    for oid in (ev[3], ev[4]):
                        if oid in orders:
                            orders[oid].remaining -= ev[9]
                            orders[oid].open = orders[oid].remaining > 0
                elif kind in (EV_CANCELLED, EV_EXPIRED) and oid in orders:
                    orders[oid].open, orders[oid].cancelled = False, True
                elif kind == EV_AMENDED and oid in orders:
                    orders[oid].remaining, orders[oid].price = ev[4], ev[3]
                    orders[oid].prices.add(ev[3])

        # What the unanswered commands of a round or of any later round could have done to an order:
        # cancel or amend it, or trade with it (or cancel it by self-trade prevention) by crossing it.
        unanswered = self.history.unanswered()
        threat: dict[int, tuple] = {}
        targets: set[int] = set()
        amended: set[int] = set()
        max_bid, min_ask, market = -1, 1 << 62, [False, False]
        for rnd in range(self.rounds, 0, -1):
            for msg in unanswered.get(rnd, ()):
                if msg["op"] in ("cancel", "amend"):
                    targets.add(msg["order_id"])
                if msg["op"] == "amend":  # the amended order may be a bid or an ask, and may cross
                    amended.add(msg["order_id"])
                    max_bid, min_ask = max(max_bid, msg["price"]), min(min_ask, msg["price"])
                elif msg["op"] == "place" and msg.get("kind") == MARKET:
                    market[msg["side"]] = True
                elif msg["op"] == "place" and msg["side"] == BID:
                    max_bid = max(max_bid, msg["price"])
                elif msg["op"] == "place":
                    min_ask = min(min_ask, msg["price"])
            threat[rnd] = (set(targets), set(amended), max_bid, min_ask, tuple(market))

        exact = journaled = bounded = closed = 0
        for oid, o in orders.items():
            live = core.orders.get(oid)
            targets, amended, max_bid, min_ask, market = threat[o.round]
            if o.side == ASK:
                crossed = market[BID] or max_bid >= min(o.prices)
            else:
                crossed = market[ASK] or min_ask <= max(o.prices)
            if not o.open and (o.cancelled or oid not in amended):
                assert live is None, f"order {oid} was closed in the answers but is open after recovery"
                closed += 1
            elif o.open and ((oid not in targets and not crossed) or oid not in unacked_touch):
                assert live is not None, f"order {oid} was open in the answers but is gone after recovery"
                assert [live[O_ACCOUNT], live[O_SIDE], live[O_PRICE], live[O_REMAINING]] == [
                    o.account, o.side, o.price, o.remaining], f"order {oid} differs from the answers"
                if oid not in targets and not crossed:
                    exact += 1
                else:
                    journaled += 1
            elif o.open and oid not in amended:  # only trades or a cancel could have come on top
                assert live is None or live[O_REMAINING] <= o.remaining, oid
                bounded += 1
        self.stats["orders_exact_by_answers"] = exact
        self.stats["orders_exact_journal"] = journaled
        self.stats["orders_closed"] = closed
        self.stats["orders_bounded"] = bounded
        TOTALS["order_claims"] += exact + journaled + closed + bounded

    def _check_conservation(self, core, events: list) -> None:
        cash = 0
        for evs in events:
            for ev in evs:
                if ev[0] in (EV_DEPOSIT, EV_CASH_ADJUSTED):
                    cash += ev[2]
                elif ev[0] == EV_WITHDRAWAL:
                    cash -= ev[2]
                elif ev[0] == EV_TRADE:
                    cash -= ev[11] + ev[12]
        assert sum(b for b, _ in core.cash.values()) == cash, "member cash is not deposits - withdrawals - fees"
        held = sum(p[P_AVAILABLE] + p[P_ENCUMBERED] + p[P_LOCKED] for p in core.credits[SYMBOL].values())
        assert held == 1000 * sum(CREDITS_T.values()), "credits were created or destroyed"

    async def _check_projection(self, events: list, end: int) -> None:
        conn = self.conn
        assert await conn.fetchval("SELECT seq FROM journal_consumers WHERE name = 'projector'") == end
        trades = {}
        payments = 0
        for seq, evs in enumerate(events, 1):
            for ev in evs:
                if ev[0] == EV_TRADE:
                    assert (ev[1], ev[2]) not in trades
                    trades[(ev[1], ev[2])] = (seq, ev[5], ev[6], ev[8], ev[9], ev[10], ev[11], ev[12])
                payments += ev[0] in (EV_DEPOSIT, EV_WITHDRAWAL)
        assert sorted(t for _, t in trades) == list(range(1, len(trades) + 1))
        settled = await conn.fetch(
            """SELECT symbol, trade_id, seq, buyer_id, seller_id, price_fen, qty_kg, value_fen, buyer_fee_fen,
                      seller_fee_fen FROM settled_trades""")
        assert len(settled) == len(trades)
        assert {(r[0], r[1]): tuple(r[2:]) for r in settled} == trades, "settled trades differ from the journal"
        assert await ledger.ledger_total(conn) == 0
        assert await ledger.balances_match_postings(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM payments") == payments + len(SEED_CASH)
        assert await cover_violations(conn) == []
        self.stats["trades"] = len(trades)
        self.stats["journal"] = end

    # ---- reporting -----------------------------------------------------------------------------

    def report(self, name: str, began: float) -> None:
        durable = self._durable_unanswered()
        inflight = [k.sent - k.answered for k in self.kills]
        print(f"\n[{name}] seed {self.seed}: {len(self.kills)} kill points "
              f"({dict(Counter(k.kind for k in self.kills))}), {self.rounds} processes, "
              f"in flight at kills {inflight}, journaled but unanswered at kills {durable}, "
              f"{dict(self.stats)}, {time.perf_counter() - began:.1f} s")
        for kind in ("burst", "startup"):
            phases = [k.phase for k in self.kills if k.kind == kind]
            if phases:
                print(f"[{name}] {kind} kills: {phases}")
        TOTALS["kill_points"] += len(self.kills)
        print(f"[crash tests so far] {dict(TOTALS)}")

    def _durable_unanswered(self) -> list[int]:
        """Per killed process: journal entries it wrote whose answers never came (lost acknowledgements)."""
        answered = {a["seq"] for i, a in self.history.answers.items()
                    if a.get("seq") is not None and self.history.sent[i][1]["op"] not in ("digest", "reconcile")}
        bounds = [*self.journal_at_spawn[1:], self.run(self.conn.fetchval("SELECT count(*) FROM journal"))]
        return [sum(s not in answered for s in range(max(3, self.journal_at_spawn[k.round - 1] + 1),
                                                     bounds[k.round - 1] + 1)) for k in self.kills]


@pytest.fixture(scope="module", autouse=True)
def _kill_point_total() -> Iterator[None]:
    yield
    print(f"\n[test_crash] {TOTALS['kill_points']} kill points in all; {dict(TOTALS)}")


@pytest.fixture
def harness(db, run, tmp_path) -> Iterator[Harness]:
    h = Harness(db, str(tmp_path / "data"), run, seed=int(os.environ.get("CRASH_SEED", "0")) or 20240607)
    try:
        yield h
    finally:
        h.close()


# ---- the tests -------------------------------------------------------------------------------------


def test_sigkill_under_pipelined_load(harness):
    began = time.perf_counter()
    server = harness.first_start()
    sizes = [120, 1_000_000]  # snapshots every 120 entries in some rounds, effectively never in others
    for i in range(14):
        harness.load_and_kill(server, harness.rng.uniform(0.05, 0.4))
        server = harness.start(sizes[i % 2])
        harness.check(server)
    harness.report("load", began)
    kills = harness.kills
    assert len(kills) == 14
    assert sum(k.sent > k.answered for k in kills) >= 10, "kills must land while commands are in flight"
    assert harness.stats["checks_from_snapshot"] > 0 and harness.stats["orders_exact_journal"] > 0
    assert harness.stats["trades"] > 0


def test_sigkill_right_after_writing_a_burst(harness):
    began = time.perf_counter()
    server = harness.first_start()
    for delay in (0.0, 0.03, 0.1, 0.2):
        # Bursts big enough to be still in flight at 200 ms on a fast machine (the service acks ~40k/s).
        harness.burst_and_kill(server, harness.rng.randint(8000, 20000), delay)
        server = harness.start()
        harness.check(server)
    harness.report("burst", began)
    assert harness.kills[0].sent > harness.kills[0].answered, "the burst killed at once had commands unanswered"
    assert sum(k.sent > k.answered for k in harness.kills) >= 3


def test_sigkill_during_startup_recovery(harness):
    began = time.perf_counter()
    server = harness.first_start()
    for _ in range(2):
        harness.load_and_kill(server, harness.rng.uniform(0.5, 0.8))
        for _ in range(3):
            harness.kill_during_startup(0.1)
        server = harness.start()
        harness.check(server)
    harness.report("startup", began)
    startup = [k for k in harness.kills if k.kind == "startup"]
    assert len(startup) == 6
    assert sum(not k.ready for k in startup) >= 3, "start-up kills must land before the service is ready"


def test_digest_answers_name_durable_states(harness):
    """A `digest` answered under load describes a journal position that survives a crash."""
    began = time.perf_counter()
    server = harness.first_start()
    checked = 0
    try:
        for _ in range(12):
            harness.load_and_kill(server, harness.rng.uniform(0.05, 0.3), digests=0.1)
            server = harness.start()
            checked += harness.check_digest_answers(server.round - 1)
        harness.check(server)
    finally:
        harness.stats["digest_answers_checked"] = checked
        harness.report("digest", began)
