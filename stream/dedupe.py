"""Bounded memory of the event ids seen per partition, so a redelivered event is learned once.

Kafka redelivers after a crash or a rebalance (at-least-once); a replayed log carries the same
ids again. Ids are kept per source partition (a user's events all live in one partition, so a
partition's owner sees every copy of its events): at least the ``capacity`` most recently seen
per partition, in two generations of up to ``capacity`` each. New ids go into the current one;
when it is full it becomes the older one and the previous older one is dropped. A generation
that is no longer current is never changed in place (forgetting a user replaces it), so a
checkpoint takes it by reference and only copies the current one (:meth:`freeze`).

>>> seen = SeenEventIds(capacity=2)
>>> [seen.check_and_add("p0", e, "u1") for e in ["a", "b", "a", "c", "b", "d", "e", "a"]]
[False, False, True, False, True, False, False, False]
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import islice

# event id -> user id (kept so a user can be forgotten), oldest first
Generation = dict[str, str]


class SeenEventIds:
    """Per-partition memory of recent event ids."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # partition -> [older generation, current generation]
        self._seen: dict[str, list[Generation]] = {}

    def check_and_add(self, partition: str, event_id: str, user: str) -> bool:
        """True if ``event_id`` was already seen on ``partition`` (recently enough); remembers it."""
        generations = self._seen.get(partition)
        if generations is None:
            generations = self._seen[partition] = [{}, {}]
        older, current = generations
        if event_id in current or event_id in older:
            return True
        current[event_id] = user
        if len(current) >= self.capacity:
            generations[0], generations[1] = current, {}
        return False

    def freeze(self, partitions: Collection[str]) -> dict[str, tuple[Generation, Generation]]:
        """The memory of those partitions as of now, quickly: the older generation by reference
        (never changed in place), a copy of the current one. :meth:`thaw` makes it JSON."""
        return {p: (older, dict(current)) for p, (older, current) in self._seen.items() if p in partitions}

    @staticmethod
    def thaw(frozen: dict[str, tuple[Generation, Generation]]) -> dict[str, list[tuple[str, str]]]:
        """:meth:`freeze`'s result as :meth:`state`'s (may run in another thread)."""
        thawed: dict[str, list[tuple[str, str]]] = {}
        for partition, generations in frozen.items():
            pairs = thawed[partition] = []
            for generation in generations:  # a chunk at a time: the GIL passes between chunks
                items = iter(generation.items())
                while chunk := list(islice(items, 4096)):
                    pairs.extend(chunk)
        return thawed

    def state(self) -> dict[str, list[tuple[str, str]]]:
        """Every partition's ids, oldest first, as (event id, user id) pairs."""
        return self.thaw(self.freeze(self._seen))

    def state_of(self, partitions: Collection[str]) -> dict[str, list[tuple[str, str]]]:
        return self.thaw(self.freeze(partitions))

    def restore(self, state: dict[str, list[list[str]]]) -> None:
        """Add the memory of :meth:`state` (replacing that of the partitions it names)."""
        for partition, pairs in state.items():
            self._seen.pop(partition, None)
            for event_id, user in pairs:
                self.check_and_add(partition, event_id, user)

    def drop(self, partitions: Collection[str]) -> None:
        for partition in partitions:
            self._seen.pop(partition, None)

    def forget(self, user: str) -> int:
        """Drop every id of the user's events; how many were held."""
        dropped = 0
        for generations in self._seen.values():
            for index, ids in enumerate(generations):
                kept = {event: owner for event, owner in ids.items() if owner != user}
                if len(kept) < len(ids):
                    dropped += len(ids) - len(kept)
                    generations[index] = kept  # a new dict: a frozen view keeps the old one
        return dropped
