"""The worker's Redis side: users whose refreshed list is not in Redis yet, re-ranked and written
in one call per chunk, and catalogue items not stored yet.

Re-ranking happens in the learning loop (a list reflects the model right after its user's
events); the Redis writes run in a background task, so learning never waits for them: a Redis
that is slow, away or hung (the client retries for up to a minute) holds up lists, not the
model. The writes themselves (serialising, the round trips) run on an event loop in a thread of
their own: on the model's loop, which learns and ranks without yielding, a write progressed only
between batches (docs/benchmarks.md, the ``redis`` stage). An outage (Redis unreachable, or
answering with an error: over maxmemory, read-only, ...) keeps the users pending, as ids, and
the catalogue items as they came, instead of losing them, and the writes back off meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable
from itertools import islice
from typing import Any, TypeVar

import numpy as np

from infra.metrics import Metrics
from infra.store import REDIS_UNAVAILABLE, RedisTopNStore
from online_models.pipeline import RefreshPipeline
from online_models.recommender import TopN
from stream.events import Item

log = logging.getLogger("pushrec.worker")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0
T = TypeVar("T")


class _WriteLoop:
    """An asyncio loop in a daemon thread: coroutines handed to :meth:`run` execute there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pushrec-list-writes", daemon=True)
        self._thread.start()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)


# An event waiting for its list carries its stamps (``infra.latency``): produced, read, taken by
# this process, learned; once re-ranked, also the round's start and end.
_LEARNED, _RANKED = 4, 6
# Catalogue items stored per write round, with that round's lists (~50 µs an item in Redis).
_ITEMS_PER_WRITE = 1000


class ListWriter:
    """Pending users (and their events' stamps, for the latency metrics) until written."""

    def __init__(
        self,
        store: RedisTopNStore,
        pipeline: RefreshPipeline,
        metrics: Metrics,
        on_change: Callable[[], None],
        on_bug: Callable[[BaseException], object],
        latency_target_s: float = 0.0,
    ) -> None:
        """``store``: a client of its own, used only on the writes' loop. ``on_change`` is called
        when a write round ends (pending may have changed); ``on_bug`` with an exception a write
        raised that is not Redis being unavailable. ``latency_target_s``: see :attr:`deadline`."""
        self.store = store
        self._writes = _WriteLoop()
        self.pipeline = pipeline
        self.metrics = metrics
        self.on_change = on_change
        self.on_bug = on_bug
        self.unwritten: dict[str, None] = {}  # touched users, not re-ranked yet
        self._stamps = array("d")  # _LEARNED per event
        # Re-ranked, waiting for the background writer: newest list per user, and event stamps.
        self._outgoing: dict[str, TopN] = {}
        self._outgoing_stamps = array("d")  # _RANKED per event
        self._in_flight: dict[str, TopN] = {}  # the lists of the write under way
        self._items: dict[str, Item] = {}  # catalogue entries not stored yet, newest per item
        self._items_in_flight: dict[str, Item] = {}
        self._task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()  # held while writing: a write never lands after a forget
        self._failures = 0  # consecutive failed writes
        self._retry_at = 0.0  # monotonic time before which no write is tried
        self.latency_target_s = latency_target_s
        # When the pending users must be re-ranked for their events' lists to make the target
        # (Unix time; inf: no event that can still make it), and what the last round took to
        # rank and to write (what a re-ranking started at the deadline still needs).
        self.deadline = math.inf
        self._rank_s = self._write_s = 0.0

    @property
    def pending(self) -> list[str]:
        """Every user whose latest list is not in Redis yet."""
        return list({**self.unwritten, **self._outgoing, **self._in_flight})

    @property
    def ranked(self) -> list[TopN]:
        """The lists ranked and not in Redis yet, of users with nothing newer to rank (a checkpoint
        keeps them as they are: re-ranked from a later state they would differ)."""
        lists = {**self._in_flight, **self._outgoing}
        return [top for user, top in lists.items() if user not in self.unwritten]

    def add_ranked(self, lists: Iterable[TopN]) -> None:
        """Write these lists as they are (restored from a checkpoint)."""
        self._outgoing.update((top.user_id, top) for top in lists if top.user_id not in self.unwritten)

    @property
    def pending_items(self) -> list[Item]:
        """Every catalogue item not stored in Redis yet (what a checkpoint keeps)."""
        return list({**self._items_in_flight, **self._items}.values())

    def add_items(self, items: Iterable[Item]) -> None:
        """Store these catalogue items (now, or after the current back-off)."""
        self._items.update((item.item_id, item) for item in items)
        self._count_unstored()
        if self._items and time.monotonic() >= self._retry_at:
            self._start()

    def _count_unstored(self) -> None:
        self.metrics.catalogue_items_unstored.set(len(self._items) + len(self._items_in_flight))

    def add(
        self,
        users: Iterable[str],
        sent_at: Iterable[float] = (),
        read_at: float = 0.0,
        got_at: float = 0.0,
        learned_at: float = 0.0,
    ) -> None:
        """These users' lists changed: their events were produced at ``sent_at``, their batch
        read at ``read_at``, taken by the model process at ``got_at``, learned at ``learned_at``."""
        self.unwritten.update(dict.fromkeys(users))
        oldest = math.inf
        for ts in sent_at:
            self._stamps.extend((ts, read_at, got_at, learned_at))
            oldest = min(oldest, ts)
        if self.latency_target_s and learned_at - oldest < self.latency_target_s:
            # (Events past the target already when learned do not hurry the re-ranking: a round
            # per batch would slow the catching up that their lists wait for.)
            due = oldest + self.latency_target_s - self._rank_s - self._write_s
            self.deadline = min(self.deadline, due)

    def forget(self, user: str) -> bool:
        """Drop the user's pending list (call with the lock held); whether there was one."""
        pending = self.unwritten.pop(user, None) is not None
        return self._outgoing.pop(user, None) is not None or pending

    def refresh(self) -> None:
        """Re-rank every pending user now and hand the lists to the background writer (started
        if idle). While Redis is backing off the users stay pending, un-ranked."""
        if not (self.unwritten or self._items) or time.monotonic() < self._retry_at:
            return
        if self.unwritten:
            users, self.unwritten = self.unwritten, {}
            self.deadline = math.inf
            started = time.time()
            self._outgoing.update((top.user_id, top) for top in self.pipeline.refresh(list(users)))
            ended = time.time()
            self._rank_s = ended - started
            ranked = np.frombuffer(self._stamps).reshape(-1, _LEARNED)
            round_ = np.broadcast_to((started, ended), (len(ranked), 2))
            self._outgoing_stamps.extend(array("d", np.hstack([ranked, round_]).tobytes()))
            self._stamps = array("d")
        self._start()

    def _start(self) -> None:
        """Start the background writer if it is idle."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_all())
            self._task.add_done_callback(self._check)

    async def flush(self) -> None:
        """Re-rank and write everything pending now, and wait for it (stop, catch-up, timer)."""
        self.refresh()
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
            self.refresh()

    async def _write_all(self) -> None:
        while self._outgoing or self._items:
            async with self.lock:
                if not await self._write_once():
                    break
        self.on_change()

    async def _write_once(self) -> bool:
        """Write what is outgoing; whether it was written."""
        lists, self._outgoing = list(self._outgoing.values()), {}
        stamps, self._outgoing_stamps = self._outgoing_stamps, array("d")
        self._in_flight = {top.user_id: top for top in lists}
        # Items first, so a list's new items are usually stored before it; but at most a chunk a
        # round: a catalogue published at once (tens of thousands) would hold the lists for seconds.
        if len(self._items) <= _ITEMS_PER_WRITE:
            self._items_in_flight, self._items = self._items, {}
        else:
            chunk = list(islice(self._items, _ITEMS_PER_WRITE))
            self._items_in_flight = {item_id: self._items.pop(item_id) for item_id in chunk}
        stored = len(self._items_in_flight)
        try:
            started = time.time()
            written = await self._writes.run(self._write(list(self._items_in_flight.values()), lists))
            self._write_s = written - started
        except REDIS_UNAVAILABLE as exc:
            kind = self.metrics.redis_error(exc)
            backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**self._failures)
            self._failures += 1
            self._retry_at = time.monotonic() + backoff
            log.error(
                "Redis write failed (%s), %d lists and %d catalogue items pending, next try in %.0f s: %s",
                kind,
                len(lists),
                len(self._items_in_flight),
                backoff,
                exc,
            )
            # Back to pending as ids, with what was re-ranked meanwhile: re-ranked again on the
            # next try, so an outage holds no lists in memory.
            self.add([*self._in_flight, *self._outgoing])
            for ranked in (stamps, self._outgoing_stamps):  # as they were before the ranking
                self._stamps.extend(np.frombuffer(ranked).reshape(-1, _RANKED)[:, :_LEARNED].ravel())
            self._outgoing, self._outgoing_stamps = {}, array("d")
            self._items = {**self._items_in_flight, **self._items}
            return False
        finally:
            self._in_flight, self._items_in_flight = {}, {}
            self._count_unstored()
        self._failures, self._retry_at = 0, 0.0
        self.metrics.catalogue_items_stored.inc(stored)
        events = np.frombuffer(stamps).reshape(-1, _RANKED)
        # The split first: a scrape that finds every event's latency counted finds its split too.
        self.metrics.slowest_events.add(np.column_stack([events, np.full(len(events), written)]))
        for ts in events[:, 0].tolist():
            self.metrics.event_to_list.observe(max(0.0, written - ts))
        self.metrics.list_refreshes.inc(len(lists))
        self.metrics.away_lists.inc(sum(top.away for top in lists))
        return True

    async def _write(self, items: list[Item], lists: list[TopN]) -> float:
        """On the writes' loop: store the items, then the lists; when they were written."""
        if items:
            await self.store.write_items(items)
        if lists:
            await self.store.write_lists(lists, time.time())
        return time.time()

    async def close(self) -> None:
        """Close the writes' client and stop their loop (after the last flush)."""
        await self._writes.run(self.store.client.aclose())
        self._writes.stop()

    def _check(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.on_bug(exc)
