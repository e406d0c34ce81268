"""Planning block changes in memory: split, move and merge serial ranges, then diff.

The registry locks the blocks a command (or a batch of commands) touches, loads them into a
`BlockPlan`, applies every movement here in order, and writes back only the difference. This
keeps the rules in small pure functions that tests can drive without a database:

* `take` removes the lowest serials first from an owner's blocks in a given state;
* `take_range` removes an exact serial range, refusing it if any part is in a state not allowed;
* `put` places a range with a new owner and state;
* `normalize` merges adjacent blocks of one issuance, owner and state (never retired or
  cancelled ones: those are final and keep the boundaries of the retirement that made them).

Ranges are half-open `[lo, hi)` over unit serials (1 unit = 1 kg), as PostgreSQL's int8range.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedDict, SortedList

from exchange.errors import CarbonxError
from matching.units import format_tonnes

AVAILABLE = "available"
ENCUMBERED = "encumbered"
RETIRED = "retired"
CANCELLED = "cancelled"
FROZEN = "frozen"
STATES = (AVAILABLE, ENCUMBERED, RETIRED, CANCELLED, FROZEN)
FINAL_STATES = frozenset({RETIRED, CANCELLED})


@dataclass(slots=True)
class Block:
    """A contiguous serial range of one issuance, held by one account in one state."""

    issuance_id: int
    lo: int
    hi: int
    owner: int
    state: str
    retirement_id: int | None = None
    id: int | None = None  # the database row, or None for a block this plan creates

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def content(self) -> tuple:
        """Everything but the row id: two blocks with equal content are the same block."""
        return (self.issuance_id, self.lo, self.hi, self.owner, self.state, self.retirement_id)


@dataclass(slots=True)
class Piece:
    """A serial range that moved, with where it came from."""

    issuance_id: int
    lo: int
    hi: int
    from_owner: int
    from_state: str

    @property
    def size(self) -> int:
        return self.hi - self.lo


class BlockPlan:
    """A working set of locked blocks that movements rewrite in memory.

    Two indexes keep every movement O(log n): blocks by issuance in serial order, and the serial
    starts of each holder's blocks per (issuance, owner, state), so "lowest serials first" is a
    pop from the front of a sorted list.
    """

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        self._by_iss: dict[int, SortedDict] = defaultdict(SortedDict)
        self._by_holder: dict[tuple[int, int, str], SortedList] = defaultdict(SortedList)
        self._held: dict[tuple[int, int, str], int] = defaultdict(int)
        self._original: dict[int, Block] = {}
        for b in blocks:
            self.add_loaded(b)

    # -- loading -------------------------------------------------------------------------------
    def add_loaded(self, block: Block) -> None:
        """Add a block read from the database (ignored if already loaded)."""
        if block.id is not None:
            if block.id in self._original:
                return
            self._original[block.id] = block
        self._insert(block)

    def has_block(self, block_id: int) -> bool:
        return block_id in self._original

    # -- queries -------------------------------------------------------------------------------
    def blocks(self, issuance_id: int | None = None) -> list[Block]:
        """The current blocks (of one issuance, or all), in serial order."""
        if issuance_id is not None:
            return list(self._by_iss.get(issuance_id, {}).values())
        return [b for iss in sorted(self._by_iss) for b in self._by_iss[iss].values()]

    def held(self, issuance_ids: Sequence[int], owner: int, state: str) -> int:
        """Units `owner` holds in `state` across `issuance_ids`, within this working set."""
        return sum(self._held.get((iss, owner, state), 0) for iss in issuance_ids)

    # -- movements ----------------------------------------------------------------------------
    def take(self, issuance_ids: Sequence[int], owner: int, state: str, qty: int) -> list[Piece]:
        """Remove `qty` units of `owner` in `state`, lowest serials first, issuance by issuance.

        Raises `insufficient_credits` (changing nothing) when fewer than `qty` units are held.
        """
        if qty <= 0:
            raise CarbonxError("invalid_quantity", f"quantity must be positive, got {qty} kg")
        check_held(qty, self.held(issuance_ids, owner, state), state)
        pieces: list[Piece] = []
        need = qty
        for iss in issuance_ids:
            starts = self._by_holder.get((iss, owner, state))
            while need and starts:
                b = self._by_iss[iss][starts[0]]
                n = min(need, b.size)
                pieces.append(Piece(iss, b.lo, b.lo + n, owner, state))
                self._remove(b)
                if n < b.size:
                    self._insert(Block(iss, b.lo + n, b.hi, b.owner, b.state, b.retirement_id))
                need -= n
            if need == 0:
                break
        return pieces

    def take_range(self, issuance_id: int, lo: int, hi: int, allowed: frozenset[str]) -> list[Piece]:
        """Remove exactly `[lo, hi)` of one issuance; every unit in it must be in an allowed state.

        The caller loads every block that overlaps the range. Raises, changing nothing, when a
        part is missing or in a state not allowed.
        """
        if hi <= lo:
            raise CarbonxError("invalid_quantity", "a serial range must hold at least one unit")
        overlapping = self._overlapping(issuance_id, lo, hi)
        covered = sum(min(b.hi, hi) - max(b.lo, lo) for b in overlapping)
        if covered != hi - lo:
            raise CarbonxError("not_found", f"serials {lo} to {hi - 1} are not all issued in issuance {issuance_id}")
        for b in overlapping:
            if b.state not in allowed:
                raise CarbonxError(
                    f"credits_{b.state}",
                    f"serials {max(b.lo, lo)} to {min(b.hi, hi) - 1} are {b.state}; "
                    f"only {', '.join(sorted(allowed))} credits can be moved here",
                )
        pieces = []
        for b in overlapping:
            self._remove(b)
            if b.lo < lo:
                self._insert(Block(issuance_id, b.lo, lo, b.owner, b.state, b.retirement_id))
            if b.hi > hi:
                self._insert(Block(issuance_id, hi, b.hi, b.owner, b.state, b.retirement_id))
            pieces.append(Piece(issuance_id, max(b.lo, lo), min(b.hi, hi), b.owner, b.state))
        return pieces

    def put(self, piece: Piece, owner: int, state: str, retirement_id: int | None = None) -> Block:
        """Place a taken piece with its new owner and state."""
        block = Block(piece.issuance_id, piece.lo, piece.hi, owner, state, retirement_id)
        self._insert(block)
        return block

    def normalize(self) -> None:
        """Merge adjacent blocks of one issuance, owner and state (final states stay as they are)."""
        for iss in list(self._by_iss):
            run: list[Block] = []
            for b in list(self._by_iss[iss].values()):
                prev = run[-1] if run else None
                if (
                    prev is not None
                    and prev.hi == b.lo
                    and prev.owner == b.owner
                    and prev.state == b.state
                    and b.state not in FINAL_STATES
                ):
                    self._remove(prev)
                    self._remove(b)
                    # Keep the lower block's row id: an unchanged left part stays untouched.
                    joined = Block(iss, prev.lo, b.hi, b.owner, b.state, None, prev.id)
                    self._insert(joined)
                    run[-1] = joined
                else:
                    run.append(b)

    # -- writing back --------------------------------------------------------------------------
    def diff(self) -> tuple[list[int], list[Block]]:
        """(row ids to delete, blocks to insert) that turn the loaded rows into the current set."""
        keep: set[int] = set()
        inserts: list[Block] = []
        for b in self.blocks():
            orig = self._original.get(b.id) if b.id is not None else None
            if orig is not None and orig.content() == b.content():
                keep.add(b.id)
            else:
                inserts.append(Block(*b.content()))
        deletes = sorted(set(self._original) - keep)
        return deletes, inserts

    # -- internals -----------------------------------------------------------------------------
    def _overlapping(self, iss: int, lo: int, hi: int) -> list[Block]:
        blocks = self._by_iss.get(iss)
        if not blocks:
            return []
        i = blocks.bisect_right(lo)
        start = i - 1 if i > 0 else 0
        out = []
        for key in blocks.islice(start):
            b = blocks[key]
            if b.lo >= hi:
                break
            if b.hi > lo:
                out.append(b)
        return out

    def _insert(self, block: Block) -> None:
        blocks = self._by_iss[block.issuance_id]
        # Only the neighbours on either side can overlap: a bisect, not a scan.
        i = blocks.bisect_left(block.lo)
        after_overlaps = i < len(blocks) and blocks.peekitem(i)[1].lo < block.hi
        before_overlaps = i > 0 and blocks.peekitem(i - 1)[1].hi > block.lo
        if after_overlaps or before_overlaps:
            raise AssertionError(f"block plan overlap at {block}")  # a planner bug, never input
        blocks[block.lo] = block
        key = (block.issuance_id, block.owner, block.state)
        self._by_holder[key].add(block.lo)
        self._held[key] += block.size

    def _remove(self, block: Block) -> None:
        del self._by_iss[block.issuance_id][block.lo]
        key = (block.issuance_id, block.owner, block.state)
        self._by_holder[key].remove(block.lo)
        self._held[key] -= block.size


def _short(qty: int, held: int, state: str) -> str:
    return f"{format_tonnes(qty)} t asked for, but only {format_tonnes(held)} t are held {state}"


def check_held(qty: int, held: int, state: str) -> None:
    """Refuse a take of `qty` kg from a holder of `held` kg in `state` (BlockPlan.take's rule, for
    a check made with a sum instead of the blocks)."""
    if held < qty:
        raise CarbonxError("insufficient_credits", _short(qty, held, state))


# --------------------------------------------------------------------------------------------
# A fast planner for batches of quantity movements (settlement)
# --------------------------------------------------------------------------------------------
class QuantityPlan:
    """Lowest-serials-first movements over whole holdings, for batches of thousands of moves.

    The same rule as `BlockPlan.take`/`put` (the lowest serials of a holder, issuance by
    issuance), with a cheaper structure for settlement's pattern: each holder
    (issuance, owner, state) keeps its blocks as a list sorted by serial with a cursor at the
    first unconsumed one, so taking is a walk from the front; a put appends and marks the holder
    for re-sorting only when it lands out of order. Only non-final states (available,
    encumbered, frozen) are handled: settlement never moves retired or cancelled credits.
    """

    __slots__ = ("_cursor", "_dirty", "_held", "_lists", "_loaded")

    def __init__(self) -> None:
        self._lists: dict[tuple[int, int, str], list[list[int]]] = {}
        self._cursor: dict[tuple[int, int, str], int] = {}
        self._dirty: set[tuple[int, int, str]] = set()
        self._held: dict[tuple[int, int, str], int] = defaultdict(int)
        self._loaded: dict[int, tuple] = {}  # row id -> content of the blocks read from the database

    def add_loaded(self, block: Block) -> None:
        if block.state in FINAL_STATES:
            raise AssertionError(f"QuantityPlan never loads final blocks: {block}")
        if block.id in self._loaded:
            return
        self._loaded[block.id] = block.content()
        self._put(block.issuance_id, block.lo, block.hi, block.owner, block.state)

    def held(self, issuance_ids: Sequence[int], owner: int, state: str) -> int:
        if len(issuance_ids) == 1:  # the usual case, without a generator: this runs per step
            return self._held.get((issuance_ids[0], owner, state), 0)
        return sum(self._held.get((iss, owner, state), 0) for iss in issuance_ids)

    def take(self, issuance_ids: Sequence[int], owner: int, state: str, qty: int) -> list[Piece]:
        """Remove `qty` units, lowest serials first; `insufficient_credits` (changing nothing)
        when fewer are held."""
        held = self.held(issuance_ids, owner, state)
        if qty <= 0 or held < qty:
            raise CarbonxError("insufficient_credits", _short(qty, held, state))
        pieces: list[Piece] = []
        need = qty
        for iss in issuance_ids:
            key = (iss, owner, state)
            blocks = self._lists.get(key)
            if not blocks:
                continue
            if key in self._dirty:
                i = self._cursor[key]
                blocks[:] = sorted(blocks[i:])
                self._cursor[key] = 0
                self._dirty.discard(key)
            i = self._cursor[key]
            n_blocks = len(blocks)
            taken = 0
            while need and i < n_blocks:
                b = blocks[i]
                lo, hi = b
                if hi - lo <= need:
                    pieces.append(Piece(iss, lo, hi, owner, state))
                    need -= hi - lo
                    taken += hi - lo
                    i += 1
                else:
                    pieces.append(Piece(iss, lo, lo + need, owner, state))
                    b[0] = lo + need
                    taken += need
                    need = 0
            self._cursor[key] = i
            self._held[key] -= taken
            if not need:
                break
        return pieces

    def put(self, piece: Piece, owner: int, state: str) -> None:
        if state in FINAL_STATES:
            raise AssertionError("QuantityPlan never makes credits final")
        self._put(piece.issuance_id, piece.lo, piece.hi, owner, state)

    def _put(self, iss: int, lo: int, hi: int, owner: int, state: str) -> None:
        key = (iss, owner, state)
        blocks = self._lists.get(key)
        if blocks is None:
            blocks = self._lists[key] = []
            self._cursor[key] = 0
        elif len(blocks) > self._cursor[key] and blocks[-1][1] > lo:
            self._dirty.add(key)
        blocks.append([lo, hi])
        self._held[key] += hi - lo

    def add_neighbour(self, block: Block) -> None:
        """A block next to a changed one, read so that the result can merge with it."""
        self.add_loaded(block)

    def edges(self) -> list[tuple[int, int, int]]:
        """(issuance, lo, hi) of the blocks that are not as loaded, after merging."""
        original = set(self._loaded.values())
        return [(b[0], b[1], b[2]) for b in self.blocks() if b not in original]

    def blocks(self) -> list[tuple]:
        """The resulting blocks as content tuples (issuance, lo, hi, owner, state, None), each
        issuance's adjacent blocks of one owner and state merged."""
        by_iss: dict[int, list[tuple[int, int, int, str]]] = defaultdict(list)
        for (iss, owner, state), blocks in self._lists.items():
            out = by_iss[iss]
            for lo, hi in blocks[self._cursor[(iss, owner, state)]:]:
                out.append((lo, hi, owner, state))
        result: list[tuple] = []
        for iss in sorted(by_iss):
            run: list | None = None
            for lo, hi, owner, state in sorted(by_iss[iss]):
                if run is not None and run[1] == lo and run[2] == owner and run[3] == state:
                    run[1] = hi
                    continue
                if run is not None:
                    result.append((iss, run[0], run[1], run[2], run[3], None))
                run = [lo, hi, owner, state]
            if run is not None:
                result.append((iss, run[0], run[1], run[2], run[3], None))
        return result

    def diff(self) -> tuple[list[int], list[Block]]:
        """(row ids to delete, blocks to insert) that turn the loaded rows into the result."""
        final = self.blocks()
        kept = set(final)
        deletes = sorted(i for i, content in self._loaded.items() if content not in kept)
        loaded = set(self._loaded.values())
        return deletes, [Block(*c) for c in final if c not in loaded]
