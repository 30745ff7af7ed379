"""Long-lived objects out of the garbage collector's sight (``infra.collector``)."""

from __future__ import annotations

import gc
import weakref

from infra.collector import freeze_what_lives


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_what_lives_is_frozen_and_garbage_is_collected_first_and_after() -> None:
    garbage = weakref.ref(_cycle())  # a cycle nothing refers to: garbage at the freeze
    alive = _cycle()
    try:
        freeze_what_lives("test")
        assert garbage() is None  # collected, not frozen with the rest
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # (frozen objects are not listed)
        later = weakref.ref(_cycle())  # garbage made after the freeze is still collected
        gc.collect()
        assert later() is None
    finally:
        gc.unfreeze()
