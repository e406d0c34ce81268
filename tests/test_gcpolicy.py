"""The collector policy of a server process (exchange/gcpolicy.py): start-up's objects frozen,
young collections rarer, reference cycles made later still freed without being asked, and all
of it undone when the server stops."""

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


def test_the_server_applies_it_and_a_stopped_server_can_be_freed(db, restore_gc):
    """Applied once start-up is done; undone on stop, so that a process that goes on (this test
    session runs many servers) does not keep every stopped exchange frozen with its event loop,
    sockets and core."""
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    thread = ServerThread(db)
    with thread:
        assert gc.get_threshold() == (gcpolicy.YOUNG, gcpolicy.MIDDLE, gcpolicy.OLD)
        assert gc.get_freeze_count() > 0
        exchange = weakref.ref(thread.exchange)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
    thread.loop.close()
    del thread
    gc.collect()
    assert exchange() is None  # frozen, it would have stayed for the life of the process
