"""The block planner alone: lowest serials first, exact ranges, merging, and a minimal diff."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.blockplan import Block, BlockPlan
from exchange.errors import CarbonxError


def _plan():
    return BlockPlan([Block(1, 1, 11, 7, "available", None, 100), Block(1, 11, 21, 8, "available", None, 101),
                      Block(1, 21, 31, 7, "available", None, 102)])


def test_take_is_lowest_first_across_blocks():
    p = _plan()
    pieces = p.take([1], 7, "available", 15)
    assert [(x.lo, x.hi) for x in pieces] == [(1, 11), (21, 26)]
    assert p.held([1], 7, "available") == 5


def test_take_refuses_more_than_held_and_changes_nothing():
    p = _plan()
    with pytest.raises(CarbonxError) as e:
        p.take([1], 7, "available", 21)
    assert e.value.code == "insufficient_credits"
    assert p.diff() == ([], [])


def test_merge_keeps_untouched_rows_and_rewrites_only_what_changed():
    p = _plan()
    for piece in p.take([1], 8, "available", 10):
        p.put(piece, 7, "available")
    p.normalize()
    deletes, inserts = p.diff()
    assert [(b.lo, b.hi, b.owner) for b in p.blocks()] == [(1, 31, 7)]
    assert deletes == [100, 101, 102] and [(b.lo, b.hi) for b in inserts] == [(1, 31)]


def test_final_states_are_never_merged():
    p = BlockPlan([Block(1, 1, 11, 7, "available", None, 1)])
    for piece in p.take([1], 7, "available", 4):
        p.put(piece, 7, "retired", retirement_id=5)
    for piece in p.take([1], 7, "available", 3):
        p.put(piece, 7, "retired", retirement_id=6)
    p.normalize()
    assert [(b.lo, b.hi, b.state, b.retirement_id) for b in p.blocks()] == [
        (1, 5, "retired", 5), (5, 8, "retired", 6), (8, 11, "available", None)]


def test_take_range_checks_every_unit():
    p = _plan()
    for piece in p.take_range(1, 5, 15, frozenset({"available"})):
        p.put(piece, piece.from_owner, "frozen")
    with pytest.raises(CarbonxError) as e:
        p.take_range(1, 1, 6, frozenset({"available"}))
    assert e.value.code == "credits_frozen"
    with pytest.raises(CarbonxError) as e:
        p.take_range(1, 25, 40, frozenset({"available"}))
    assert e.value.code == "not_found"


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 15)), max_size=40))
def test_random_moves_conserve_and_stay_disjoint(moves):
    p = BlockPlan([Block(1, 1, 31, 0, "available", None, 1), Block(2, 1, 21, 1, "available", None, 2)])
    for src, dst, qty in moves:
        try:
            pieces = p.take([1, 2], src, "available", qty)
        except CarbonxError:
            continue
        assert sum(x.size for x in pieces) == qty
        for x in pieces:
            p.put(x, dst, "available")
    p.normalize()
    for iss, size in ((1, 30), (2, 20)):
        blocks = p.blocks(iss)
        assert sum(b.size for b in blocks) == size
        assert all(a.hi == b.lo for a, b in itertools.pairwise(blocks))
        assert all((a.owner, a.state) != (b.owner, b.state) for a, b in itertools.pairwise(blocks))
