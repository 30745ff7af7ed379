"""Bounded memory of the event ids seen per partition, so a redelivered event is learned once.

Kafka redelivers after a crash or a rebalance (at-least-once); a replayed log carries the same
ids again. Ids are kept per source partition (a user's events all live in one partition, so a
partition's owner sees every copy of its events), the ``capacity`` most recently seen per partition.

>>> seen = SeenEventIds(capacity=2)
>>> [seen.check_and_add("p0", e, "u1") for e in ["a", "b", "a", "c", "b"]]
[False, False, True, False, False]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection


class SeenEventIds:
    """Per-partition LRU sets of event ids."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # partition -> event id -> user id (kept so a user can be forgotten), oldest first.
        self._seen: dict[str, OrderedDict[str, str]] = {}

    def check_and_add(self, partition: str, event_id: str, user: str) -> bool:
        """True if ``event_id`` was already seen on ``partition`` (recently enough); remembers it."""
        ids = self._seen.get(partition)
        if ids is None:
            ids = self._seen[partition] = OrderedDict()
        if event_id in ids:
            ids.move_to_end(event_id)
            return True
        ids[event_id] = user
        if len(ids) > self.capacity:
            ids.popitem(last=False)
        return False

    def state(self) -> dict[str, list[list[str]]]:
        return {partition: [list(pair) for pair in ids.items()] for partition, ids in self._seen.items()}

    def restore(self, state: dict[str, list[list[str]]]) -> None:
        """Add the memory of :meth:`state` (replacing that of the partitions it names)."""
        for partition, pairs in state.items():
            self._seen[partition] = OrderedDict((event, user) for event, user in pairs)

    def state_of(self, partitions: Collection[str]) -> dict[str, list[list[str]]]:
        return {p: [list(pair) for pair in ids.items()] for p, ids in self._seen.items() if p in partitions}

    def drop(self, partitions: Collection[str]) -> None:
        for partition in partitions:
            self._seen.pop(partition, None)

    def forget(self, user: str) -> int:
        """Drop every id of the user's events; how many were held."""
        dropped = 0
        for ids in self._seen.values():
            for event_id in [e for e, owner in ids.items() if owner == user]:
                del ids[event_id]
                dropped += 1
        return dropped
