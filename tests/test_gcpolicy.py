"""The collector policy of a server process (exchange/gcpolicy.py): start-up's objects frozen,
young collections rarer, and reference cycles made later still freed without being asked."""

from __future__ import annotations

import gc
import weakref

import pytest

from exchange import gcpolicy
from tests.api_helpers import ServerThread


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_cycles_are_still_collected_automatically(restore_gc):
    gcpolicy.apply()
    assert gc.get_threshold() == (gcpolicy.YOUNG, gcpolicy.MIDDLE, gcpolicy.OLD)
    assert gc.get_freeze_count() > 0
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone cannot free it
    keep = []
    for _ in range(3 * gcpolicy.YOUNG):  # allocations enough for a young collection, none asked for
        keep.append([])
        if gone() is None:
            break
    assert gone() is None


def test_the_server_applies_it_after_start_up(db, restore_gc):
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    with ServerThread(db):
        assert gc.get_threshold() == (gcpolicy.YOUNG, gcpolicy.MIDDLE, gcpolicy.OLD)
        assert gc.get_freeze_count() > 0
