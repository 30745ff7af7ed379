"""Bounded memory of the event ids seen per partition, so a redelivered event is learned once.

Kafka redelivers after a crash or a rebalance (at-least-once); a replayed log carries the same
ids again. Ids are kept per source partition (a user's events all live in one partition, so a
partition's owner sees every copy of its events): at least the ``capacity`` most recently seen
per partition, in two generations of up to ``capacity`` each. New ids go into the current one;
when it is full it becomes the older one and the previous older one is dropped.

A checkpoint must take the memory in an instant (:meth:`freeze`), so a generation is a list of
segments that are never changed in place once sealed (forgetting a user replaces them), and
the live segment new ids go into. Freezing copies the live segment while it is small, and seals
it otherwise, so it never copies more than a sixteenth of the capacity and a generation has at
most seventeen segments.

>>> seen = SeenEventIds(capacity=2)
>>> [seen.check_and_add("p0", e, "u1") for e in ["a", "b", "a", "c", "b", "d", "e", "a"]]
[False, False, True, False, True, False, False, False]
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from itertools import chain, islice

import orjson

# event id -> user id (kept so a user can be forgotten), oldest first
Segment = dict[str, str]
_SEGMENTS = 16  # a live segment of more than capacity / _SEGMENTS ids is sealed, not copied


class _Memory:
    """One partition's ids: the older generation's segments, the current one's sealed segments,
    and the live segment (the newest ids)."""

    __slots__ = ("older", "sealed", "live", "count")

    def __init__(self) -> None:
        self.older: list[Segment] = []
        self.sealed: list[Segment] = []
        self.live: Segment = {}
        self.count = 0  # ids in the current generation (sealed and live)


# A partition's memory as of a checkpoint: its segments, oldest first, none changed afterwards.
Frozen = tuple[Segment, ...]


class SeenEventIds:
    """Per-partition memory of recent event ids."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: dict[str, _Memory] = {}

    def check_and_add(self, partition: str, event_id: str, user: str) -> bool:
        """True if ``event_id`` was already seen on ``partition`` (recently enough); remembers it."""
        memory = self._seen.get(partition)
        if memory is None:
            memory = self._seen[partition] = _Memory()
        if event_id in memory.live:
            return True
        for segment in chain(memory.sealed, memory.older):
            if event_id in segment:
                return True
        memory.live[event_id] = user
        memory.count += 1
        if memory.count >= self.capacity:
            memory.older, memory.sealed, memory.live, memory.count = [*memory.sealed, memory.live], [], {}, 0
        return False

    def freeze(self, partitions: Collection[str]) -> dict[str, Frozen]:
        """The memory of those partitions as of now, quickly (at most capacity / 16 ids copied per
        partition). :meth:`thaw` makes it JSON."""
        frozen: dict[str, Frozen] = {}
        for partition, memory in self._seen.items():
            if partition not in partitions:
                continue
            if len(memory.live) * _SEGMENTS > self.capacity:
                memory.sealed.append(memory.live)
                memory.live = {}
                frozen[partition] = (*memory.older, *memory.sealed)
            else:
                frozen[partition] = (*memory.older, *memory.sealed, dict(memory.live))
        return frozen

    @staticmethod
    def thaw(frozen: dict[str, Frozen]) -> dict[str, list[tuple[str, str]]]:
        """:meth:`freeze`'s result as :meth:`state`'s (may run in another thread)."""
        return {
            partition: [pair for chunk in _chunks(segments) for pair in chunk]
            for partition, segments in frozen.items()
        }

    @staticmethod
    def thaw_json(frozen: dict[str, Frozen]) -> dict[str, list[bytes]]:
        """:meth:`thaw`'s result as runs of the members of JSON lists, up to 4,096 ids each, to
        be written one after the other (no list of every id: a young list of a hundred thousand
        pairs made each young collection scan them all)."""
        return {
            partition: [orjson.dumps(chunk)[1:-1] for chunk in _chunks(segments)]
            for partition, segments in frozen.items()
        }

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
        for memory in self._seen.values():
            live_before = len(memory.live)
            for name in ("older", "sealed"):
                segments = getattr(memory, name)
                for index, ids in enumerate(segments):
                    kept = {event: owner for event, owner in ids.items() if owner != user}
                    if len(kept) < len(ids):
                        dropped += len(ids) - len(kept)
                        segments[index] = kept  # a new dict: a frozen view keeps the old one
            for event in [event for event, owner in memory.live.items() if owner == user]:
                del memory.live[event]  # the live segment is never part of a frozen view
            dropped += live_before - len(memory.live)
            memory.count = sum(map(len, memory.sealed)) + len(memory.live)
        return dropped


def _chunks(segments: Frozen) -> Iterator[list[tuple[str, str]]]:
    """The (event id, user id) pairs of ``segments``, oldest first, up to 4,096 at a time (the
    GIL passes between chunks)."""
    for segment in segments:
        items = iter(segment.items())
        while chunk := list(islice(items, 4096)):
            yield chunk
