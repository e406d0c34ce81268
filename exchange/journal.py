"""The journal and snapshots in PostgreSQL, and recovery of the exchange core from them.

The journal is the system of record: one row per accepted command, ``(seq, ts, command,
events)``, commands and events stored as orjson bytes. Rows are appended in group-commit batches
(:func:`append`, by COPY or by executemany) and never change. A snapshot is the core's
:meth:`~matching.core.ExchangeCore.snapshot` at a journal position. :func:`recover` loads the
newest snapshot and replays the journal after it; with ``verify`` it also checks that every
replayed command gives, byte for byte, the events that were journaled, which proves the core
deterministic on the real history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from matching.core import ExchangeCore

COLUMNS = ("seq", "ts", "command", "events")
Row = tuple[int, int, bytes, bytes]
READ_CHUNK = 20_000


class JournalMismatch(RuntimeError):
    """Replaying the journal did not reproduce what it recorded (a determinism bug or damage)."""


def encode_row(seq: int, ts: int, command: dict, events: list) -> Row:
    return (seq, ts, orjson.dumps(command), orjson.dumps(events))


async def append(conn: asyncpg.Connection, rows: Sequence[Row], method: str = "copy") -> None:
    """Write `rows` (in a transaction the caller owns, or on their own)."""
    if method == "copy":
        await conn.copy_records_to_table("journal", records=rows, columns=COLUMNS)
    elif method == "executemany":
        await conn.executemany("INSERT INTO journal (seq, ts, command, events) VALUES ($1, $2, $3, $4)", rows)
    else:
        raise ValueError(f"unknown journal write method {method!r}")


async def lock_position(conn: asyncpg.Connection, consumer: str) -> int:
    """The consumer's position, its row locked until the caller's transaction ends (created at 0
    the first time), in one round trip: the lock makes two instances of a consumer take turns
    instead of applying a batch twice."""
    return await conn.fetchval(
        "INSERT INTO journal_consumers (name, seq) VALUES ($1, 0) "
        "ON CONFLICT (name) DO UPDATE SET seq = journal_consumers.seq RETURNING seq", consumer)


async def save_position(conn: asyncpg.Connection, consumer: str, seq: int) -> None:
    """Move the consumer's position to `seq`, in the transaction that wrote what it applied."""
    await conn.execute("UPDATE journal_consumers SET seq = $2 WHERE name = $1", consumer, seq)


async def last_seq(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM journal")


async def read(conn: asyncpg.Connection, after: int, limit: int = READ_CHUNK, upto: int | None = None) -> list:
    """Journal rows with seq > `after` (and <= `upto`), in order, at most `limit`."""
    if upto is None:
        return await conn.fetch(
            "SELECT seq, ts, command, events FROM journal WHERE seq > $1 ORDER BY seq LIMIT $2", after, limit)
    return await conn.fetch(
        "SELECT seq, ts, command, events FROM journal WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        after, upto, limit)


@dataclass(frozen=True)
class Snapshot:
    seq: int
    state_digest: str
    state: bytes


async def save_snapshot(conn: asyncpg.Connection, seq: int, digest: str, state: bytes, keep: int = 3) -> None:
    """Store a snapshot taken at `seq` and prune all but the newest `keep`."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO snapshots (seq, state_digest, state) VALUES ($1, $2, $3) ON CONFLICT (seq) DO NOTHING",
            seq, digest, state)
        await conn.execute(
            "DELETE FROM snapshots WHERE seq < (SELECT min(seq) FROM "
            "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT $1) newest)", keep)


async def latest_snapshot(conn: asyncpg.Connection, at_most: int | None = None) -> Snapshot | None:
    row = await conn.fetchrow(
        "SELECT seq, state_digest, state FROM snapshots WHERE seq <= $1 ORDER BY seq DESC LIMIT 1",
        at_most if at_most is not None else 1 << 62)
    return Snapshot(row["seq"], row["state_digest"], row["state"]) if row else None


def apply_rows(core: ExchangeCore, rows: Sequence, verify: bool = True) -> None:
    """Replay journal rows onto `core`, which must be exactly at the position before the first."""
    apply = core.apply
    loads, dumps = orjson.loads, orjson.dumps
    for seq, ts, command, events in rows:
        out = apply(loads(command), ts)
        if out.seq != seq:
            raise JournalMismatch(f"journal entry {seq} replayed as {out.seq} ({out.code}: {out.detail})")
        if verify and dumps(out.events) != events:
            raise JournalMismatch(f"journal entry {seq}: replay gave different events")


async def recover(
    conn: asyncpg.Connection, *, engine: str | None = None, use_snapshot: bool = True, verify: bool = True,
    upto: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> ExchangeCore:
    """The core as of the journal's end (or `upto`): newest snapshot, then replay."""
    core = ExchangeCore(engine)
    snap = await latest_snapshot(conn, upto) if use_snapshot else None
    if snap is not None:
        core = ExchangeCore.restore(snap.state, engine)
        if verify and ExchangeCore.snapshot_digest(snap.state, core) != snap.state_digest:
            raise JournalMismatch(f"snapshot at {snap.seq} does not match its digest")
    end = upto if upto is not None else await last_seq(conn)
    start = core.seq
    while core.seq < end:
        rows = await read(conn, core.seq, READ_CHUNK, end)
        if not rows:
            raise JournalMismatch(f"journal ends at {core.seq}, expected {end}")
        apply_rows(core, rows, verify)
        if progress is not None:
            progress(core.seq - start, end - start)
    return core
