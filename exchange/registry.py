"""The carbon registry on PostgreSQL: projects, issuances, movements of serial blocks, retirements.

Every change of who holds which serials, or in which state, goes through `apply_movements`: it
locks the accounts involved (in id order, so concurrent movements cannot deadlock), locks and
loads the blocks concerned into a `BlockPlan`, applies the movements in memory, and writes back
the difference plus one append-only transfer row per moved range, all in one transaction. Two
transactions moving the same credits therefore serialise on the owner's account row: the second
sees the first's result and fails cleanly if the credits are gone. The database itself refuses
overlapping blocks, uncovered issuances and changes to retired or cancelled blocks.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg
import orjson

from exchange.accounts import Account, get_account
from exchange.blockplan import (
    AVAILABLE,
    CANCELLED,
    FINAL_STATES,
    FROZEN,
    RETIRED,
    Block,
    BlockPlan,
    Piece,
    QuantityPlan,
    check_held,
)
from exchange.errors import CarbonxError
from exchange.serials import SerialRange, format_serial, parse_serial
from exchange.text import blank, fits, unsafe
from matching.units import format_tonnes

METHODOLOGIES = (
    "forest_carbon_sink", "grassland_carbon_sink", "wetland_carbon_sink", "energy_substitution",
    "renewable_energy", "energy_efficiency", "methane_recovery", "low_carbon_transport", "other",
)
_SCHEME = re.compile(r"[A-Z][A-Z0-9]{1,15}")
_PROJECT_CODE = re.compile(r"[A-Z0-9]+(-[A-Z0-9]+)*")  # projects_code_check
MAX_SERIAL = 10_000_000_000  # ten digits of kilograms per project vintage
_CERT_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"  # no 0/O, 1/I/L: codes are read aloud and typed


# --------------------------------------------------------------------------------------------
# Movements
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ByQuantity:
    """Move `qty` kg of `from_owner`'s credits in `from_state`, lowest serials first."""

    issuance_ids: tuple[int, ...]
    from_owner: int
    from_state: str
    to_owner: int
    to_state: str
    qty: int
    cause: str
    cause_ref: str
    retirement_id: int | None = None


@dataclass(frozen=True)
class ByRange:
    """Move exactly the serials `[lo, hi)` of one issuance, whoever holds them, to a new state
    (and a new owner, if `to_owner` is given). Every unit must be in one of `allowed` states."""

    issuance_id: int
    lo: int
    hi: int
    allowed: frozenset[str]
    to_state: str
    cause: str
    cause_ref: str
    to_owner: int | None = None


Movement = ByQuantity | ByRange


@dataclass
class MovementResult:
    """The ranges one movement moved, lowest first."""

    pieces: list[Piece] = field(default_factory=list)
    replayed: bool = False  # found by its idempotency key (freeze, unfreeze, cancel), not made now

    @property
    def quantity(self) -> int:
        return sum(p.size for p in self.pieces)


# An operator's change of a serial range under an idempotency key: (account id, key, digest of
# the request), the digest telling a repeat from another request under a reused key.
ChangeRequest = tuple[int, str, bytes]


_BLOCK_COLUMNS = "id, issuance_id, lower(serials) AS lo, upper(serials) AS hi, owner_account_id, state, retirement_id"


def _block(row: asyncpg.Record) -> Block:
    return Block(row["issuance_id"], row["lo"], row["hi"], row["owner_account_id"], row["state"],
                 row["retirement_id"], row["id"])


async def apply_movements(conn: asyncpg.Connection, movements: Sequence[Movement]) -> list[MovementResult]:
    """Apply `movements` in order, in one transaction, all or nothing.

    This is the registry's batch transfer function: clearing settles many trades through one call.
    Raises `CarbonxError` (nothing changed) when any movement cannot be made; the message names
    the movement's position in the batch.
    """
    if not movements:
        return []
    for m in movements:
        _check_movement(m)
    if conn.is_in_transaction():
        # The caller's transaction (e.g. a retirement with its certificate row) makes it atomic; a
        # savepoint here would only add round trips.
        return await _apply_with_retries(conn, movements)
    async with conn.transaction():
        return await _apply_with_retries(conn, movements)


async def check_movements(conn: asyncpg.Connection, movements: Sequence[Movement]) -> list[MovementResult]:
    """What `apply_movements` would move as the registry stands, changing and locking nothing:
    raises the `CarbonxError` it would raise (insufficient_credits, credits_frozen, ...).

    For a caller with a step to take before the change (the exchange journals the take of the
    credits from its core first) that must leave no trace of a change the registry refuses. The
    change itself can still be refused, by what moves in between; the caller undoes its step then.
    """
    if not movements:
        return []
    for m in movements:
        _check_movement(m)
    if conn.is_in_transaction():  # the caller's snapshot (READ COMMITTED: one per statement)
        results = await _plan(conn, movements, BlockPlan(), set(), lock=False)
    else:
        # One snapshot: no range changes hands between the look-ups, so the plan is never None.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            results = await _plan(conn, movements, BlockPlan(), set(), lock=False)
    if results is None:
        raise CarbonxError("busy", "the credits changed hands while being looked at; try again")
    return results


async def _check_held(conn: asyncpg.Connection, m: ByQuantity) -> None:
    """Refuse `m` as BlockPlan.take would, from a sum rather than the holder's blocks (a member
    may hold thousands): a movement by quantity is refused only for want of credits."""
    held = await conn.fetchval(
        """SELECT coalesce(sum(upper(serials) - lower(serials)), 0)::bigint FROM blocks
           WHERE owner_account_id = $1 AND state = $2 AND issuance_id = ANY($3::bigint[])""",
        m.from_owner, m.from_state, list(m.issuance_ids))
    check_held(m.qty, held, m.from_state)


async def _apply_with_retries(conn: asyncpg.Connection, movements: Sequence[Movement]) -> list[MovementResult]:
    for _attempt in range(5):
        results = await _try_apply(conn, movements)
        if results is not None:
            return results
    raise CarbonxError("busy", "the credits kept changing hands while being moved; try again")


def _check_movement(m: Movement) -> None:
    if isinstance(m, ByQuantity):
        if not isinstance(m.qty, int) or m.qty <= 0:
            raise CarbonxError("invalid_quantity", f"quantity must be a positive number of kg, got {m.qty!r}")
        if not m.issuance_ids:
            raise CarbonxError("not_found", "no issuance to move credits from")
    elif m.hi <= m.lo:
        raise CarbonxError("invalid_quantity", "a serial range must hold at least one unit")
    if m.to_state in FINAL_STATES and m.cause not in ("retirement", "cancel"):
        raise CarbonxError("invalid_state", f"only a retirement or a cancellation makes credits {m.to_state}")


async def _try_apply(conn: asyncpg.Connection, movements: Sequence[Movement]) -> list[MovementResult] | None:
    """One attempt; None when a serial range changed owner between the look-up and the lock."""
    plan = BlockPlan()
    owners: set[int] = set()
    results = await _plan(conn, movements, plan, owners, lock=True)
    if results is None:
        return None
    await _load_neighbours(conn, plan, owners)
    plan.normalize()
    deletes, inserts = plan.diff()
    if deletes:
        await conn.execute("DELETE FROM blocks WHERE id = ANY($1::bigint[])", deletes)
    if inserts:
        await conn.execute(
            """INSERT INTO blocks (issuance_id, serials, owner_account_id, state, retirement_id)
               SELECT iss, int8range(lo, hi), owner, state, ret
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[])
                    AS t(iss, lo, hi, owner, state, ret)""",
            [b.issuance_id for b in inserts], [b.lo for b in inserts], [b.hi for b in inserts],
            [b.owner for b in inserts], [b.state for b in inserts], [b.retirement_id for b in inserts],
        )
    await _write_transfers(conn, movements, results, plan)
    return results


async def _plan(conn: asyncpg.Connection, movements: Sequence[Movement], plan: BlockPlan, owners: set[int],
                *, lock: bool) -> list[MovementResult] | None:
    """Load the blocks `movements` touch into `plan`, locking them and their holders (`owners`,
    filled in) when `lock`, and make the movements in it. The results; None when a range changed
    hands between the look-up of its holders and their lock. Raises what refuses a movement."""
    for m in movements:
        if isinstance(m, ByQuantity):
            owners.update((m.from_owner, m.to_owner))
        elif m.to_owner is not None:
            owners.add(m.to_owner)
    ranges = [m for m in movements if isinstance(m, ByRange)]
    if ranges:
        # Whoever holds a range must be locked too; read them first, then lock and re-check.
        rows = await conn.fetch(
            """SELECT DISTINCT b.owner_account_id FROM blocks b
               JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(iss, lo, hi)
                 ON b.issuance_id = r.iss AND b.serials && int8range(r.lo, r.hi)""",
            [m.issuance_id for m in ranges], [m.lo for m in ranges], [m.hi for m in ranges],
        )
        owners.update(r[0] for r in rows)
    if lock:
        await conn.execute(
            "SELECT id FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE", sorted(owners)
        )
    locking = "FOR UPDATE" if lock else ""

    holders = sorted({(m.from_owner, m.from_state, iss) for m in movements if isinstance(m, ByQuantity)
                      for iss in m.issuance_ids})
    if holders:
        rows = await conn.fetch(
            f"""SELECT {_BLOCK_COLUMNS} FROM blocks
                WHERE (owner_account_id, state, issuance_id) IN
                      (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[]))
                ORDER BY id {locking}""",
            [h[0] for h in holders], [h[1] for h in holders], [h[2] for h in holders],
        )
        for r in rows:
            plan.add_loaded(_block(r))
    if ranges:
        rows = await conn.fetch(
            f"""SELECT {_BLOCK_COLUMNS} FROM blocks b
                WHERE EXISTS (SELECT 1 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(iss, lo, hi)
                              WHERE b.issuance_id = r.iss AND b.serials && int8range(r.lo, r.hi))
                ORDER BY id {locking}""",
            [m.issuance_id for m in ranges], [m.lo for m in ranges], [m.hi for m in ranges],
        )
        if any(r["owner_account_id"] not in owners for r in rows):
            return None  # a range changed hands before we locked its holder: look again
        for r in rows:
            plan.add_loaded(_block(r))

    results: list[MovementResult] = []
    for i, m in enumerate(movements):
        try:
            if isinstance(m, ByQuantity):
                pieces = plan.take(m.issuance_ids, m.from_owner, m.from_state, m.qty)
                for p in pieces:
                    plan.put(p, m.to_owner, m.to_state, m.retirement_id)
            else:
                pieces = plan.take_range(m.issuance_id, m.lo, m.hi, m.allowed)
                for p in pieces:
                    plan.put(p, p.from_owner if m.to_owner is None else m.to_owner, m.to_state)
        except CarbonxError as e:
            if len(movements) > 1:
                raise CarbonxError(e.code, f"movement {i + 1} of {len(movements)}: {e.message}") from None
            raise
        results.append(MovementResult(pieces))
    return results


async def _load_neighbours(conn: asyncpg.Connection, plan: BlockPlan, owners: set[int]) -> None:
    """Lock and load the blocks just outside the changed ones, so that `normalize` can merge them."""
    edges = [(b.issuance_id, b.lo, b.hi) for b in plan.blocks() if b.id is None and b.state not in FINAL_STATES]
    if not edges:
        return
    for r in await _lock_neighbours(conn, edges, sorted(owners)):
        plan.add_loaded(_block(r))


async def _lock_neighbours(conn: asyncpg.Connection, edges: list[tuple[int, int, int]],
                           owners: list[int]) -> list[asyncpg.Record]:
    """Lock and read the live blocks of `owners` that touch an edge (issuance, lo, hi) from
    outside: ending at lo or starting at hi."""
    # Two index probes (blocks_by_upper, blocks_by_lower) rather than one OR, which scans the table.
    return await conn.fetch(
        f"""SELECT {_BLOCK_COLUMNS} FROM blocks b
            WHERE b.id IN (SELECT n.id FROM unnest($1::bigint[], $2::bigint[]) AS e(iss, lo)
                           JOIN blocks n ON n.issuance_id = e.iss AND upper(n.serials) = e.lo
                           UNION
                           SELECT n.id FROM unnest($1::bigint[], $3::bigint[]) AS e(iss, hi)
                           JOIN blocks n ON n.issuance_id = e.iss AND lower(n.serials) = e.hi)
              AND b.owner_account_id = ANY($4::bigint[]) AND b.state NOT IN ('retired', 'cancelled')
            ORDER BY id FOR UPDATE""",
        [e[0] for e in edges], [e[1] for e in edges], [e[2] for e in edges], owners,
    )


async def _write_transfers(
    conn: asyncpg.Connection, movements: Sequence[Movement], results: list[MovementResult], plan: BlockPlan
) -> None:
    cols: tuple[list, ...] = ([], [], [], [], [], [], [], [], [])
    for m, res in zip(movements, results, strict=True):
        for p in res.pieces:
            to_owner = m.to_owner if m.to_owner is not None else p.from_owner
            for col, value in zip(cols, (p.issuance_id, p.lo, p.hi, p.from_owner, p.from_state, to_owner,
                                         m.to_state, m.cause, m.cause_ref), strict=True):
                col.append(value)
    await conn.execute(
        """INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, to_state,
                                  cause, cause_ref)
           SELECT iss, int8range(lo, hi), fo, fs, t, ts, c, r
           FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[],
                       $7::text[], $8::text[], $9::text[]) AS x(iss, lo, hi, fo, fs, t, ts, c, r)""",
        *cols,
    )


# --------------------------------------------------------------------------------------------
# Settlement batches
# --------------------------------------------------------------------------------------------
class Step(NamedTuple):  # not a frozen dataclass: cheaper to build by the thousand
    """One lowest-serials-first movement of a settlement batch (see `apply_steps`)."""

    issuance_ids: tuple[int, ...]
    from_owner: int
    from_state: str
    to_owner: int
    to_state: str
    qty: int
    cause: str
    cause_ref: str


class StepsFailed(CarbonxError):
    """A step of `apply_steps` found too few credits; nothing was written."""


def _check_steps(steps: Sequence[Step]) -> None:
    for st in steps:
        if not isinstance(st.qty, int) or st.qty <= 0 or not st.issuance_ids:
            raise CarbonxError("invalid_quantity", f"a settlement step needs a positive quantity: {st!r}")
        if st.to_state in FINAL_STATES or st.from_state in FINAL_STATES:
            raise CarbonxError("invalid_state", "settlement never moves final credits")


async def apply_steps(conn: asyncpg.Connection, steps: Sequence[Step],
                      also_lock: Sequence[tuple[int, str, int]] = ()) -> None:
    """Apply settlement `steps` in order inside the caller's transaction: the batch form of
    `apply_movements` for `ByQuantity` moves between non-final states (see `StepBatch`)."""
    batch = StepBatch(steps, also_lock)
    await batch.lock(conn)
    batch.plan()
    await batch.write(conn)


class StepBatch:
    """Settlement steps applied in three phases, so that a caller can run other statements while
    the middle one (pure Python) runs.

    Same rules and the same locks as `apply_movements`: `lock` locks the accounts involved FOR NO
    KEY UPDATE in id order, then reads their blocks FOR UPDATE; `plan` moves the credits in
    memory (`QuantityPlan`, lowest serials first) and raises `StepsFailed`, having written
    nothing, when a step finds too few credits; `write` reads the merge neighbours and writes
    the difference with one DELETE and one COPY, and one COPY of transfer rows, a row per moved
    range naming its step's cause. `also_lock` names further holders (owner, state, issuance) to
    lock and read, and `also_owners` further accounts to lock, so that a caller can lock first
    and give the steps to `plan` later (e.g. built while the server does other work), or plan
    another order of the same work on the same locks (`replan`).
    """

    def __init__(self, steps: Sequence[Step], also_lock: Sequence[tuple[int, str, int]] = (),
                 also_owners: Iterable[int] = ()) -> None:
        _check_steps(steps)
        self.steps = list(steps)
        self.owners = sorted({o for st in steps for o in (st.from_owner, st.to_owner)} | {h[0] for h in also_lock}
                             | set(also_owners))
        self.holders = sorted({(st.from_owner, st.from_state, iss) for st in steps for iss in st.issuance_ids}
                              | set(also_lock))
        self._rows: list[Block] = []
        self._plan: QuantityPlan | None = None
        self._transfers: tuple[list, ...] = ()

    async def lock(self, conn: asyncpg.Connection) -> None:
        if not self.holders:
            return
        await conn.execute("SELECT id FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                           self.owners)
        h = self.holders
        rows = await conn.fetch(
            f"""SELECT {_BLOCK_COLUMNS} FROM blocks
                WHERE (owner_account_id, state, issuance_id) IN
                      (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[]))
                ORDER BY id FOR UPDATE""",
            [x[0] for x in h], [x[1] for x in h], [x[2] for x in h],
        )
        self._rows = [_block(r) for r in rows]

    def replan(self, steps: Sequence[Step]) -> None:
        """Plan `steps` instead, on the blocks already read (a fallback after `StepsFailed`)."""
        self.plan(steps)

    def plan(self, steps: Sequence[Step] | None = None) -> None:
        """Plan the steps, or `steps` instead if given (their holders and accounts must have been
        locked); raises `StepsFailed`, having written nothing, when a step finds too few credits."""
        if steps is not None:
            _check_steps(steps)
            # Set comprehensions rather than a test per step: this runs for thousands of steps.
            unlocked = ({(st.from_owner, st.from_state, iss) for st in steps for iss in st.issuance_ids}
                        - set(self.holders))
            strangers = {o for st in steps for o in (st.from_owner, st.to_owner)} - set(self.owners)
            if unlocked or strangers:
                raise AssertionError(f"steps read holders {sorted(unlocked)} or move credits of accounts "
                                     f"{sorted(strangers)} that were not locked")
            self.steps = list(steps)
        plan = QuantityPlan()
        for b in self._rows:
            plan.add_loaded(b)
        cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])
        iss_c, range_c, fo_c, fs_c, to_c, ts_c, cause_c, ref_c = cols
        steps = self.steps
        for i, st in enumerate(steps):
            try:
                pieces = plan.take(st.issuance_ids, st.from_owner, st.from_state, st.qty)
            except CarbonxError as e:
                raise StepsFailed(e.code, f"step {i + 1} of {len(steps)} ({st.cause} {st.cause_ref}): "
                                          f"{e.message}") from None
            for p in pieces:
                plan.put(p, st.to_owner, st.to_state)
                iss_c.append(p.issuance_id)
                range_c.append(asyncpg.Range(p.lo, p.hi))
                fo_c.append(st.from_owner)
                fs_c.append(st.from_state)
                to_c.append(st.to_owner)
                ts_c.append(st.to_state)
                cause_c.append(st.cause)
                ref_c.append(st.cause_ref)
        self._plan, self._transfers = plan, cols

    async def write(self, conn: asyncpg.Connection) -> None:
        plan = self._plan
        if plan is None:
            return
        edges = plan.edges()
        if edges:
            for r in await _lock_neighbours(conn, edges, self.owners):
                plan.add_neighbour(_block(r))
        deletes, inserts = plan.diff()
        if deletes:
            await conn.execute("DELETE FROM blocks WHERE id = ANY($1::bigint[])", deletes)
        if inserts:
            await conn.copy_records_to_table(
                "blocks", records=[(b.issuance_id, asyncpg.Range(b.lo, b.hi), b.owner, b.state) for b in inserts],
                columns=("issuance_id", "serials", "owner_account_id", "state"))
        if self._transfers and self._transfers[0]:
            await conn.copy_records_to_table(
                "transfers", records=zip(*self._transfers, strict=True),
                columns=("issuance_id", "serials", "from_account_id", "from_state", "to_account_id", "to_state",
                         "cause", "cause_ref"))


# --------------------------------------------------------------------------------------------
# Projects and issuances
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Project:
    id: int
    scheme: str
    code: str
    name: str
    methodology: str
    region: str
    developer_account_id: int
    status: str


@dataclass(frozen=True)
class Issuance:
    id: int
    project_id: int
    project_code: str
    scheme: str
    vintage: int
    lo: int
    hi: int
    issued_to_account_id: int
    repeated: bool = False  # an earlier issuance with the same reference, not made by this call

    @property
    def quantity(self) -> int:
        return self.hi - self.lo

    @property
    def serial(self) -> str:
        return format_serial(self.scheme, self.project_code, self.vintage, self.lo, self.hi)


async def add_project(
    conn: asyncpg.Connection, *, code: str, name: str, methodology: str, developer: str,
    region: str = "", scheme: str = "CDHF",
) -> Project:
    """Register a project for a developer account; `project_exists` if the code is taken."""
    # The table's CHECK, in words (stricter than an account code's rule, which said 1–40 and '_')
    if not isinstance(code, str) or len(code) > 32 or not _PROJECT_CODE.fullmatch(code):
        raise CarbonxError("invalid_code", f"project code {code!r} must be at most 32 upper-case letters and digits, "
                                           "in groups joined by single '-' (e.g. LQS-FS)")
    if methodology not in METHODOLOGIES:
        raise CarbonxError("invalid_methodology",
                           f"methodology {methodology!r} must be one of: {', '.join(METHODOLOGIES)}")
    if not name or not name.strip() or len(name) > 200:
        raise CarbonxError("invalid_name", "project name must be 1–200 characters")
    # The table's CHECKs, said in words before the database says them in its own
    if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
        raise CarbonxError("invalid_project", f"scheme {scheme!r} must be 2–16 upper-case letters or digits, "
                                              "starting with a letter (e.g. CDHF)")
    if not isinstance(region, str) or len(region) > 100:
        raise CarbonxError("invalid_project", "region must be at most 100 characters")
    # Names and regions are printed on certificates and pages: REST refuses such text, and so
    # must every other way in (the command line wrote it unchecked: review27).
    for what, text in (("project name", name), ("region", region)):
        if (why := unsafe(text)) is not None:
            raise CarbonxError("invalid_name" if what == "project name" else "invalid_project", f"{what}: {why}")
    dev = _member(await get_account(conn, developer), "issued to (as the project's developer)")
    try:
        row = await conn.fetchrow(
            """INSERT INTO projects (scheme, code, name, methodology, region, developer_account_id)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (code) DO NOTHING RETURNING id""",
            scheme, code, name.strip(), methodology, region, dev.id,
        )
    except asyncpg.CheckViolationError as e:
        raise CarbonxError("invalid_project", f"project refused: {e}") from None
    if row is None:
        raise CarbonxError("project_exists", f"project {code} already exists")
    return Project(row["id"], scheme, code, name.strip(), methodology, region, dev.id, "active")


async def get_project(conn: asyncpg.Connection, code: str) -> Project:
    row = await conn.fetchrow(
        """SELECT id, scheme, code, name, methodology, region, developer_account_id, status
           FROM projects WHERE code = $1""", code.strip().upper(),  # codes are upper case: any case finds it
    )
    if row is None:
        raise CarbonxError("not_found", f"no project {code!r}")
    return Project(**dict(row))


async def list_projects(conn: asyncpg.Connection) -> list[Project]:
    rows = await conn.fetch(
        "SELECT id, scheme, code, name, methodology, region, developer_account_id, status FROM projects ORDER BY code"
    )
    return [Project(**dict(r)) for r in rows]


_ISSUANCE_SELECT = """SELECT i.id, i.project_id, p.code AS project_code, p.scheme, i.vintage,
                             lower(i.serials) AS lo, upper(i.serials) AS hi, i.issued_to_account_id
                      FROM issuances i JOIN projects p ON p.id = i.project_id"""


def _member(account: Account, what: str) -> Account:
    """`account` if credits may be put in it: a member's. The exchange keeps member holdings in
    step with the registry; credits given to an operator or a system account (CX-FEES) were out
    of its sight, and every reconcile after the next start reported them as a difference."""
    if account.role != "member":
        raise CarbonxError("invalid_request", f"credits can only be {what} a member account; "
                                              f"{account.code} is {'an' if account.role[0] in 'aeiou' else 'a'} "
                                              f"{account.role} account")
    return account


async def issue(
    conn: asyncpg.Connection, *, project: str, vintage: int, quantity_kg: int, to_account: str | None = None,
    reference: str = "",
) -> Issuance:
    """Issue `quantity_kg` of a project vintage after verification: new serials, one block, one transfer.

    Serials continue after the vintage's last issuance. The credits go to the project's developer
    unless `to_account` says otherwise. A `reference` (the verification's, say) makes it safe to
    repeat: the vintage's issuance with that reference is returned (`repeated`) if it is the same
    issuance, and `duplicate_reference` refused if it is another; nothing is issued twice.
    """
    if not isinstance(quantity_kg, int) or quantity_kg <= 0:
        raise CarbonxError("invalid_quantity", f"quantity must be positive, got {quantity_kg!r} kg")
    if not isinstance(vintage, int) or not 1990 <= vintage <= 2100:
        raise CarbonxError("invalid_vintage", f"vintage must be a year between 1990 and 2100, got {vintage!r}")
    reference = (reference or "").strip()  # "VR-1 " is VR-1, and only spaces is no reference
    if len(reference) > 200 or (why := unsafe(reference)) is not None:
        raise CarbonxError("invalid_reference", "reference must be at most 200 characters" if len(reference) > 200
                           else f"reference: {why}")
    async with conn.transaction():
        proj = await get_project(conn, project)
        holder = _member(await get_account(conn, to_account), "issued to") if to_account else None
        holder_id = holder.id if holder else proj.developer_account_id
        # Lock the project row so two issuances of one vintage cannot pick the same serials (nor
        # two repeats of one reference both issue).
        await conn.execute("SELECT 1 FROM projects WHERE id = $1 FOR NO KEY UPDATE", proj.id)
        if reference:
            done = await conn.fetchrow(
                """SELECT id, lower(serials) AS lo, upper(serials) AS hi, issued_to_account_id FROM issuances
                   WHERE project_id = $1 AND vintage = $2 AND reference = $3 ORDER BY id LIMIT 1""",
                proj.id, vintage, reference)
            if done is not None:
                if (done["hi"] - done["lo"], done["issued_to_account_id"]) != (quantity_kg, holder_id):
                    to = await conn.fetchval("SELECT code FROM accounts WHERE id = $1", done["issued_to_account_id"])
                    raise CarbonxError("duplicate_reference",
                                       f"reference {reference!r} of {project} {vintage} is issuance {done['id']} "
                                       f"({format_tonnes(done['hi'] - done['lo'])} t to {to}), not this one")
                return Issuance(done["id"], proj.id, proj.code, proj.scheme, vintage, done["lo"], done["hi"],
                                holder_id, repeated=True)
        # After the repeat's look-up (a repeat answers even once the project stopped issuing) and
        # under the project's lock (read where no status change can pass it).
        proj = await get_project(conn, project)
        if proj.status != "active":
            raise CarbonxError("project_not_active", f"project {project} is {proj.status}; it cannot issue")
        lo = await conn.fetchval(
            "SELECT coalesce(max(upper(serials)), 1) FROM issuances WHERE project_id = $1 AND vintage = $2",
            proj.id, vintage,
        )
        hi = lo + quantity_kg
        if hi > MAX_SERIAL:
            raise CarbonxError("invalid_quantity",
                               f"vintage {vintage} of {project} would pass {MAX_SERIAL - 1} serials")
        iss_id = await conn.fetchval(
            """INSERT INTO issuances (project_id, vintage, serials, issued_to_account_id, reference)
               VALUES ($1, $2, int8range($3, $4), $5, $6) RETURNING id""",
            proj.id, vintage, lo, hi, holder_id, reference,
        )
        await conn.execute(
            """INSERT INTO blocks (issuance_id, serials, owner_account_id, state)
               VALUES ($1, int8range($2, $3), $4, 'available')""", iss_id, lo, hi, holder_id,
        )
        await conn.execute(
            """INSERT INTO transfers (issuance_id, serials, from_account_id, from_state, to_account_id, to_state,
                                      cause, cause_ref)
               VALUES ($1, int8range($2, $3), NULL, NULL, $4, 'available', 'issuance', $5)""",
            iss_id, lo, hi, holder_id, f"issuance:{iss_id}",
        )
    return Issuance(iss_id, proj.id, proj.code, proj.scheme, vintage, lo, hi, holder_id)


async def get_issuance(conn: asyncpg.Connection, issuance_id: int) -> Issuance:
    row = await conn.fetchrow(_ISSUANCE_SELECT + " WHERE i.id = $1", issuance_id)
    if row is None:
        raise CarbonxError("not_found", f"no issuance {issuance_id}")
    return Issuance(**dict(row))


async def list_issuances(conn: asyncpg.Connection, project_id: int | None = None) -> list[Issuance]:
    if project_id is None:
        rows = await conn.fetch(_ISSUANCE_SELECT + " ORDER BY i.id")
    else:
        rows = await conn.fetch(_ISSUANCE_SELECT + " WHERE i.project_id = $1 ORDER BY i.id", project_id)
    return [Issuance(**dict(r)) for r in rows]


def split_symbol(symbol: str) -> tuple[str, int]:
    """`LQS-FS-2023` → ("LQS-FS", 2023): an instrument symbol is a project code and a vintage."""
    code, _, vintage = symbol.strip().upper().rpartition("-")
    if not code or len(vintage) != 4 or not (vintage.isascii() and vintage.isdigit()):
        raise CarbonxError("invalid_symbol", f"{symbol!r} is not a symbol: expected PROJECT-VINTAGE, e.g. LQS-FS-2023")
    return code, int(vintage)


async def resolve_issuances(conn: asyncpg.Connection, *, symbol: str | None = None,
                            issuance_id: int | None = None) -> tuple[int, ...]:
    """The issuances credits of a symbol (project vintage) or of one issuance come from, oldest first."""
    if (symbol is None) == (issuance_id is None):
        raise CarbonxError("invalid_request", "give exactly one of a symbol or an issuance id")
    if issuance_id is not None:
        return ((await get_issuance(conn, issuance_id)).id,)
    code, vintage = split_symbol(symbol)
    proj = await get_project(conn, code)
    ids = await conn.fetch("SELECT id FROM issuances WHERE project_id = $1 AND vintage = $2 ORDER BY id",
                           proj.id, vintage)
    if not ids:
        raise CarbonxError("not_found", f"project {code} has no vintage {vintage} issued")
    return tuple(r["id"] for r in ids)


async def resolve_serial(conn: asyncpg.Connection, text: str) -> tuple[Issuance, SerialRange]:
    """The issuance a serial text lies in (the range must lie inside one issuance). A text that
    reads as units of two projects (a short form: CDHF-GW-2023-2023-2030 is GW-2023's unit 2030 or
    GW's units 2023-2030) is refused as ambiguous rather than resolved to one of them: a cancel
    is for good, and it cancelled another project's credits."""
    found = []
    for reading in parse_serial(text):
        row = await conn.fetchrow(
            _ISSUANCE_SELECT + """ WHERE p.code = $1 AND p.scheme = $2 AND i.vintage = $3
                                     AND i.serials @> int8range($4, $5)""",
            reading.project_code, reading.scheme, reading.vintage, reading.lo, reading.hi,
        )
        if row is not None:
            found.append((Issuance(**dict(row)), reading))
    if len(found) > 1:
        named = "; ".join(format_serial(r.scheme, r.project_code, r.vintage, r.lo, r.hi) for _, r in found)
        raise CarbonxError("ambiguous_serial", f"serial {text} can be read as {named}: write it in full, as the "
                                               "registry prints it")
    if found:
        return found[0]
    raise CarbonxError("not_found", f"serial {text} was never issued (or spans two issuances)")


# --------------------------------------------------------------------------------------------
# Transfers, retirements, operator actions
# --------------------------------------------------------------------------------------------
async def transfer(
    conn: asyncpg.Connection, *, from_account: str, to_account: str, quantity_kg: int,
    symbol: str | None = None, issuance_id: int | None = None, cause: str = "transfer", cause_ref: str,
) -> MovementResult:
    """Move available credits between accounts (over the counter, or a settled trade)."""
    if not isinstance(cause_ref, str) or blank(cause_ref) or len(cause_ref) > 200:
        raise CarbonxError("invalid_reference", "a transfer's reference must be 1–200 characters (not only spaces)")
    if (why := unsafe(cause_ref)) is not None:
        raise CarbonxError("invalid_reference", f"reference: {why}")
    src = await get_account(conn, from_account)
    dst = _member(await get_account(conn, to_account), "transferred to")
    if src.id == dst.id:
        raise CarbonxError("invalid_request", "a transfer needs two different accounts")
    ids = await resolve_issuances(conn, symbol=symbol, issuance_id=issuance_id)
    [res] = await apply_movements(conn, [ByQuantity(ids, src.id, AVAILABLE, dst.id, AVAILABLE, quantity_kg,
                                                    cause, cause_ref)])
    return res


@dataclass(frozen=True)
class Retirement:
    id: int
    account_id: int
    quantity_kg: int
    beneficiary: str
    purpose: str
    certificate_code: str
    serials: tuple[str, ...]
    replayed: bool = False  # found by its idempotency key, not made by this request


def new_certificate_code() -> str:
    """A verification code such as `CX-7KQ2-M9PD-XW4R`: 12 characters of 31, about 59.5
    random bits, easy to read aloud."""
    chars = "".join(secrets.choice(_CERT_ALPHABET) for _ in range(12))
    return f"CX-{chars[:4]}-{chars[4:8]}-{chars[8:]}"


async def retire(
    conn: asyncpg.Connection, *, account: str, quantity_kg: int, beneficiary: str, purpose: str,
    symbol: str | None = None, issuance_id: int | None = None, request: tuple[str, bytes] | None = None,
    dry_run: bool = False,
) -> Retirement | None:
    """Retire available credits for a named beneficiary; the retired ranges can never move again.
    `request` is the (idempotency key, request digest) the retirement is recorded under, if any
    (see retirement_by_request). A `dry_run` refuses what the retirement would be refused for as
    the registry stands, and records, changes and locks nothing (returns None)."""
    beneficiary, purpose = (beneficiary or "").strip(), (purpose or "").strip()
    if not fits(beneficiary, 200):
        raise CarbonxError("invalid_beneficiary", "beneficiary must be 1–200 characters")
    if not fits(purpose, 500):
        raise CarbonxError("invalid_purpose", "purpose must be 1–500 characters")
    # The API refuses such text before it gets here; the command line and other callers do not.
    for code, what, text in (("invalid_beneficiary", "beneficiary", beneficiary),
                             ("invalid_purpose", "purpose", purpose)):
        if (why := unsafe(text)) is not None:
            raise CarbonxError(code, f"{what}: {why}")
    if not isinstance(quantity_kg, int) or quantity_kg <= 0:
        raise CarbonxError("invalid_quantity", f"quantity must be positive, got {quantity_kg!r} kg")
    acct = await get_account(conn, account)
    ids = await resolve_issuances(conn, symbol=symbol, issuance_id=issuance_id)
    # Checked before the certificate's row is made: a refusal then uses up no retirement id (the
    # ids are public, on certificates), unless the credits move between the check and the take.
    await _check_held(conn, _retirement(ids, acct.id, quantity_kg, None))
    if dry_run:
        return None
    async with conn.transaction():
        code = new_certificate_code()
        key, digest = request if request is not None else (None, None)
        ret_id = await conn.fetchval(
            """INSERT INTO retirements (account_id, quantity_kg, beneficiary, purpose, certificate_code,
                                        request_key, request_hash)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
            acct.id, quantity_kg, beneficiary, purpose, code, key, digest,
        )
        [res] = await apply_movements(conn, [_retirement(ids, acct.id, quantity_kg, ret_id)])
    serials = []
    for p in res.pieces:
        iss = await get_issuance(conn, p.issuance_id)
        serials.append(format_serial(iss.scheme, iss.project_code, iss.vintage, p.lo, p.hi))
    return Retirement(ret_id, acct.id, quantity_kg, beneficiary, purpose, code, tuple(serials))


def _retirement(ids: tuple[int, ...], account_id: int, quantity_kg: int, ret_id: int | None) -> ByQuantity:
    return ByQuantity(ids, account_id, AVAILABLE, account_id, RETIRED, quantity_kg, "retirement",
                      f"retirement:{ret_id}", ret_id)


async def retirement_by_request(conn: asyncpg.Connection, account_id: int, key: str
                                ) -> tuple[Retirement, bytes] | None:
    """The retirement `account_id` made under idempotency key `key`, with the digest of the request
    that made it; None if it made none."""
    row = await conn.fetchrow(
        """SELECT id, account_id, quantity_kg, beneficiary, purpose, certificate_code, request_hash
           FROM retirements WHERE account_id = $1 AND request_key = $2""", account_id, key)
    if row is None:
        return None
    serials = tuple((await retired_serials(conn, [row["id"]]))[row["id"]])
    return (Retirement(row["id"], row["account_id"], row["quantity_kg"], row["beneficiary"], row["purpose"],
                       row["certificate_code"], serials, replayed=True), bytes(row["request_hash"]))


async def retired_serials(conn: asyncpg.Connection, retirement_ids: list[int]) -> dict[int, list[str]]:
    """Each retirement's serial ranges as text, by issuance then serial, in one query."""
    out: dict[int, list[str]] = {i: [] for i in retirement_ids}
    for r in await conn.fetch(
            """SELECT b.retirement_id, p.scheme, p.code, i.vintage, lower(b.serials) AS lo, upper(b.serials) AS hi
               FROM blocks b JOIN issuances i ON i.id = b.issuance_id JOIN projects p ON p.id = i.project_id
               WHERE b.retirement_id = ANY($1::bigint[]) ORDER BY b.retirement_id, i.id, lower(b.serials)""",
            retirement_ids):
        out[r["retirement_id"]].append(format_serial(r["scheme"], r["code"], r["vintage"], r["lo"], r["hi"]))
    return out


async def _by_serial(conn: asyncpg.Connection, serial: str, allowed: frozenset[str], to_state: str,
                     cause: str, reason: str, dry_run: bool, request: ChangeRequest | None) -> MovementResult:
    if not reason or blank(reason):
        raise CarbonxError("invalid_reason", f"say why: a {cause} needs a reason that the history will show")
    if (why := unsafe(reason)) is not None:
        raise CarbonxError("invalid_reason", f"reason: {why}")
    iss, rng = await resolve_serial(conn, serial)
    movement = ByRange(iss.id, rng.lo, rng.hi, allowed, to_state, cause, reason.strip())
    if dry_run:
        return (await check_movements(conn, [movement]))[0]
    async with conn.transaction():
        if request is not None:
            found = await change_by_request(conn, request)
            if found is not None:
                return found
        [res] = await apply_movements(conn, [movement])
        if request is not None:
            await conn.execute(
                "INSERT INTO registry_change_requests (account_id, request_key, request_hash, action, pieces) "
                "VALUES ($1, $2, $3, $4, $5::jsonb)", *request, cause,
                orjson.dumps([[p.issuance_id, p.lo, p.hi, p.from_owner, p.from_state] for p in res.pieces]).decode())
    return res


async def change_by_request(conn: asyncpg.Connection, request: ChangeRequest) -> MovementResult | None:
    """What the freeze, unfreeze or cancel that account request[0] made under idempotency key
    request[1] moved (`replayed`); None if it made none; `idempotency_key_reused` if that change
    was asked for by another request (its digest is not request[2])."""
    row = await conn.fetchrow("SELECT request_hash, action, pieces FROM registry_change_requests "
                              "WHERE account_id = $1 AND request_key = $2", request[0], request[1])
    if row is None:
        return None
    if bytes(row["request_hash"]) != request[2]:
        raise CarbonxError("idempotency_key_reused", f"Idempotency-Key {request[1]!r} was used for another "
                                                     f"request (a {row['action']})")
    return MovementResult([Piece(*p) for p in orjson.loads(row["pieces"])], replayed=True)

# A `dry_run` of freeze, unfreeze or cancel refuses what the change would be refused for as the
# registry stands, and returns what it would move; it changes and locks nothing. With `request`
# (an idempotency key), a repeat returns what the first request moved and changes nothing.


async def freeze(conn: asyncpg.Connection, *, serial: str, reason: str, dry_run: bool = False,
                request: ChangeRequest | None = None) -> MovementResult:
    """Operator: freeze available credits in a serial range (e.g. under investigation)."""
    return await _by_serial(conn, serial, frozenset({AVAILABLE}), FROZEN, "freeze", reason, dry_run, request)


async def unfreeze(conn: asyncpg.Connection, *, serial: str, reason: str, dry_run: bool = False,
                  request: ChangeRequest | None = None) -> MovementResult:
    """Operator: make frozen credits in a serial range available again."""
    return await _by_serial(conn, serial, frozenset({FROZEN}), AVAILABLE, "unfreeze", reason, dry_run, request)


async def cancel(conn: asyncpg.Connection, *, serial: str, reason: str, dry_run: bool = False,
                request: ChangeRequest | None = None) -> MovementResult:
    """Operator: cancel available or frozen credits for good (e.g. a reversal of a sink)."""
    return await _by_serial(conn, serial, frozenset({AVAILABLE, FROZEN}), CANCELLED, "cancel", reason, dry_run, request)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
async def holdings(conn: asyncpg.Connection, account: str) -> list[dict]:
    """An account's credits per project vintage and state, in kg."""
    acct = await get_account(conn, account)
    rows = await conn.fetch(
        """SELECT p.code AS project, i.vintage, b.state, sum(upper(b.serials) - lower(b.serials))::bigint AS kg
           FROM blocks b JOIN issuances i ON i.id = b.issuance_id JOIN projects p ON p.id = i.project_id
           WHERE b.owner_account_id = $1 GROUP BY p.code, i.vintage, b.state ORDER BY 1, 2, 3""",
        acct.id,
    )
    return [dict(r) for r in rows]


async def issuance_blocks(conn: asyncpg.Connection, issuance_id: int, *, limit: int | None = None,
                          after: int = 0) -> list[dict]:
    """The blocks of an issuance in serial order, with who holds them: its units after serial
    number `after` (the block holding after + 1 cut to start there), at most `limit` blocks (None:
    all, for the operator's CLI). A page's cursor is its last unit, so a page that follows covers
    the units after it whatever merged or split meanwhile (a cursor at the last block's start
    skipped a block that merged into it: review30). Blocks never overlap: a page is the block
    holding after + 1 (one probe) and one range of the index blocks_by_lower."""
    rows = await conn.fetch(
        """SELECT greatest(lower(b.serials), $2::bigint + 1) AS lo, upper(b.serials) AS hi, a.code AS owner, b.state,
                  r.certificate_code
           FROM blocks b JOIN accounts a ON a.id = b.owner_account_id
           LEFT JOIN retirements r ON r.id = b.retirement_id
           WHERE b.issuance_id = $1 AND upper(b.serials) > $2::bigint + 1
             AND lower(b.serials) >= coalesce((SELECT lower(serials) FROM blocks WHERE issuance_id = $1
                                                 AND lower(serials) <= $2::bigint + 1
                                               ORDER BY lower(serials) DESC LIMIT 1), $2::bigint + 1)
           ORDER BY lower(b.serials) LIMIT $3""",
        issuance_id, after, limit,
    )
    return [dict(r) for r in rows]


async def serial_history(conn: asyncpg.Connection, serial: str, *, limit: int | None = None, after: int = 0,
                         holders_after: int = 0) -> tuple[Issuance, SerialRange, list[dict], list[dict]]:
    """The movements that touched any unit of a serial range, oldest first, and who holds it now
    (blocks cut to the range, in serial order). Each list is a page of at most `limit` (None:
    all, for the operator's CLI): movements with a transfer id above `after`, the range's units
    after serial number `holders_after` (blocks cut to the range and to start after it)."""
    iss, rng = await resolve_serial(conn, serial)
    movements = """SELECT t.id, t.created_at, t.cause, t.cause_ref, lower(t.serials) AS lo, upper(t.serials) AS hi,
                          fa.code AS from_account, t.from_state, ta.code AS to_account, t.to_state
                   FROM {source} t
                   LEFT JOIN accounts fa ON fa.id = t.from_account_id
                   JOIN accounts ta ON ta.id = t.to_account_id
                   ORDER BY t.id"""
    if limit is None:
        history = await conn.fetch(movements.format(source="carbonx_transfers_overlapping($1, int8range($2, $3))"),
                                   iss.id, rng.lo, rng.hi)
    else:
        # A page costs a page, not the whole history (migration 0010).
        history = await conn.fetch(
            movements.format(source="carbonx_transfers_overlapping_page($1, int8range($2, $3), $4, $5)"),
            iss.id, rng.lo, rng.hi, after, limit)
    # The blocks overlapping [lo, hi) are the one holding lo, if any, and those starting inside:
    # one range of blocks_by_lower from the start of the block holding lo (found by one probe).
    # A page of holders starts after its cursor, the last unit the page before showed.
    start = max(rng.lo, holders_after + 1)
    now = await conn.fetch(
        """SELECT greatest(lower(b.serials), $2) AS lo, least(upper(b.serials), $3) AS hi, a.code AS owner, b.state,
                  r.certificate_code
           FROM blocks b JOIN accounts a ON a.id = b.owner_account_id
           LEFT JOIN retirements r ON r.id = b.retirement_id
           WHERE b.issuance_id = $1 AND lower(b.serials) < $3 AND upper(b.serials) > $2
             AND lower(b.serials) >= coalesce((SELECT lower(serials) FROM blocks WHERE issuance_id = $1
                                                 AND lower(serials) <= $2 ORDER BY lower(serials) DESC LIMIT 1), $2)
           ORDER BY lower(b.serials) LIMIT $4""",
        iss.id, start, rng.hi, limit,
    ) if start < rng.hi else []
    return iss, rng, [dict(r) for r in history], [dict(r) for r in now]


async def retirement_by_code(conn: asyncpg.Connection, code: str) -> dict:
    """A retirement and its serial ranges, found by certificate code (public verification)."""
    row = await conn.fetchrow(
        """SELECT r.id, r.quantity_kg, r.beneficiary, r.purpose, r.certificate_code, r.created_at, a.code AS account
           FROM retirements r JOIN accounts a ON a.id = r.account_id WHERE r.certificate_code = $1""",
        code.strip().upper(),
    )
    if row is None:
        raise CarbonxError("not_found", f"no certificate {code!r}")
    ranges = await conn.fetch(
        """SELECT p.scheme, p.code AS project, p.name AS project_name, p.methodology, i.vintage,
                  lower(b.serials) AS lo, upper(b.serials) AS hi
           FROM blocks b JOIN issuances i ON i.id = b.issuance_id JOIN projects p ON p.id = i.project_id
           WHERE b.retirement_id = $1 ORDER BY i.id, lower(b.serials)""", row["id"],
    )
    out = dict(row)
    out["ranges"] = [
        dict(r) | {"serial": format_serial(r["scheme"], r["project"], r["vintage"], r["lo"], r["hi"])} for r in ranges
    ]
    return out


