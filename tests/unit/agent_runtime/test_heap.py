"""settle_heap (agent/runtime/heap.py): cyclic garbage is freed first, then what survives is out of later full
collections (a full pass over the agent's heap took ~31 ms with the GIL held during a transfer)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from agent.runtime.heap import settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's heap back in the collector's reach


def test_garbage_is_collected_and_the_living_heap_is_frozen() -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    garbage = weakref.ref(a)
    del a, b  # a cycle: only the collector frees it
    kept = _Node()
    settle_heap()
    assert garbage() is None  # collected, not frozen alive
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # a full collection no longer walks it
    assert kept.other is None


def test_what_an_earlier_settle_froze_is_freed_once_it_becomes_garbage() -> None:
    # a model version frozen alive at one commit and released at the next must not leak
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    old_version = weakref.ref(a)
    settle_heap()  # frozen alive
    del a, b  # released: garbage in a cycle, inside the permanent generation
    settle_heap()
    assert old_version() is None
