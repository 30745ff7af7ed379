"""The worker's Redis side: users whose refreshed list is not in Redis yet, re-ranked and written
in one call per chunk, and catalogue items not stored yet.

Re-ranking happens in the learning loop (a list reflects the model right after its user's
events); the Redis writes run in a process of their own (``consumers.list_store``), so learning
never waits for them: a Redis that is slow, away or hung (the client retries for up to a
minute) holds up lists, not the model. A round's lists are handed over as soon as they are
ranked, or as soon as the write before them is answered: the model never waits for an answer,
and the store needs no turn of the model's event loop or the GIL to write. An outage (Redis
unreachable, or answering with an error: over maxmemory, read-only, ...) keeps the users
pending, as ids, and the catalogue items as they came, instead of losing them, and the writes
back off meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable
from itertools import islice

import numpy as np

from consumers.list_store import ListStore
from infra.metrics import Metrics
from infra.store import REDIS_UNAVAILABLE
from online_models.pipeline import RefreshPipeline
from online_models.recommender import TopN
from stream.events import Item

log = logging.getLogger("pushrec.worker")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0


# An event waiting for its list carries its stamps (``infra.latency``): produced, read, taken by
# this process, learned; once re-ranked, also the round's start and end.
_LEARNED, _RANKED = 4, 6
# Catalogue items stored per write round, with that round's lists (~50 µs an item in Redis).
_ITEMS_PER_WRITE = 1000


class ListWriter:
    """Pending users (and their events' stamps, for the latency metrics) until written."""

    def __init__(
        self,
        store: ListStore,
        pipeline: RefreshPipeline,
        metrics: Metrics,
        on_change: Callable[[], None],
        on_bug: Callable[[BaseException], object],
        latency_target_s: float = 0.0,
    ) -> None:
        """``store``: the store process's end (``consumers.list_store``). ``on_change`` is called
        when a write round ends (pending may have changed); ``on_bug`` with an exception a write
        raised that is not Redis being unavailable. ``latency_target_s``: see :attr:`deadline`."""
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.on_change = on_change
        self.on_bug = on_bug
        self.unwritten: dict[str, None] = {}  # touched users, not re-ranked yet
        self._stamps = array("d")  # _LEARNED per event
        self._stamp_users: list[str] = []  # each of those events' user
        # Re-ranked, waiting for the write under way: newest list per user, and event stamps.
        self._outgoing: dict[str, TopN] = {}
        self._outgoing_stamps = array("d")  # _RANKED per event
        self._in_flight: dict[str, TopN] = {}  # the lists of the write under way
        self._items: dict[str, Item] = {}  # catalogue entries not stored yet, newest per item
        self._items_in_flight: dict[str, Item] = {}
        # The write under way (its events' stamps, when it was sent), and its answer's arrival.
        self._sent: tuple[array, float] | None = None
        self._answered = asyncio.Event()
        self._watching = False  # the event loop watches the store for the answer
        self._quiet = 0  # sections (a forget, a hand-over) during which no write starts
        self._failures = 0  # consecutive failed writes
        self._retry_at = 0.0  # monotonic time before which no write is tried
        self.latency_target_s = latency_target_s
        # When the pending users must be re-ranked for their events' lists to make the target
        # (Unix time; inf: no event that can still make it), and what the last round took to
        # rank (its first chunk, whose lists the oldest events wait for) and to write (what a
        # re-ranking started at the deadline still needs).
        self.deadline = math.inf
        self._rank_s = self._write_s = 0.0

    @property
    def waiting(self) -> bool:
        """Whether any list or catalogue item is not in Redis yet (without listing them)."""
        return bool(
            self.unwritten or self._outgoing or self._in_flight or self._items or self._items_in_flight
        )

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
        self._pump()

    def _count_unstored(self) -> None:
        self.metrics.catalogue_items_unstored.set(len(self._items) + len(self._items_in_flight))

    def add(
        self,
        users: Iterable[str],
        events: Iterable[tuple[str, float]] = (),
        read_at: float = 0.0,
        got_at: float = 0.0,
        learned_at: float = 0.0,
    ) -> None:
        """These users' lists changed: ``events`` are their events, each ``(user, produced
        at)``, whose batch was read at ``read_at``, taken by the model process at ``got_at`` and
        learned at ``learned_at``."""
        self.unwritten.update(dict.fromkeys(users))
        oldest = math.inf
        for user, ts in events:
            self._stamps.extend((ts, read_at, got_at, learned_at))
            self._stamp_users.append(user)
            oldest = min(oldest, ts)
        if self.latency_target_s and learned_at - oldest < self.latency_target_s:
            # (Events past the target already when learned do not hurry the re-ranking: a round
            # per batch would slow the catching up that their lists wait for.)
            due = oldest + self.latency_target_s - self._rank_s - self._write_s
            self.deadline = min(self.deadline, due)

    def forget(self, user: str) -> bool:
        """Drop the user's pending list (call within :meth:`quiet`); whether there was one."""
        pending = self.unwritten.pop(user, None) is not None
        return self._outgoing.pop(user, None) is not None or pending

    def refresh(self) -> None:
        """Re-rank every pending user now, the first touched first, and hand the lists to the
        store a chunk at a time (``RefreshPipeline.chunks``; each now, or when the write under way
        is answered). While Redis is backing off the users stay pending, un-ranked."""
        if self.unwritten and time.monotonic() >= self._retry_at:
            users, self.unwritten = list(self.unwritten), {}
            self.deadline = math.inf
            stamps, owners = np.frombuffer(self._stamps).reshape(-1, _LEARNED), self._stamp_users
            chunks = self.pipeline.chunks(users)
            chunk_of = {user: k for k, chunk in enumerate(chunks) for user in chunk}
            events_of: list[list[int]] = [[] for _ in chunks]  # each chunk's events, in order
            for at, user in enumerate(owners):
                events_of[chunk_of.get(user, 0)].append(at)
            self._stamps, self._stamp_users = array("d"), []
            for k, chunk in enumerate(chunks):
                if time.monotonic() < self._retry_at:  # a write failed meanwhile: the rest wait too
                    self.unwritten.update(dict.fromkeys(user for rest in chunks[k:] for user in rest))
                    waiting = [at for rest in events_of[k:] for at in rest]
                    self._stamps.extend(stamps[waiting].ravel())
                    self._stamp_users.extend(owners[at] for at in waiting)
                    break
                started = time.time()
                self._outgoing.update((top.user_id, top) for top in self.pipeline.refresh(chunk))
                ended = time.time()
                if not k:  # what the oldest events' lists wait for (``deadline``)
                    self._rank_s = ended - started
                events = stamps[events_of[k]]
                ranked_at = np.broadcast_to((started, ended), (len(events), 2))
                self._outgoing_stamps.extend(array("d", np.hstack([events, ranked_at]).tobytes()))
                self._pump()
        self._pump()

    async def flush(self) -> None:
        """Re-rank and write everything pending now, and wait for it (stop, catch-up, timer)."""
        self.refresh()
        while self._sent is not None:
            await self._answered.wait()
            self.refresh()

    @contextlib.asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """Within: no write under way and none started, so a list written before cannot land
        after what is done here (a forget's deletes, a partition handed over)."""
        self._quiet += 1
        try:
            while self._sent is not None:
                await self._answered.wait()
            yield
        finally:
            self._quiet -= 1
            self._pump()

    def _pump(self) -> None:
        """Move the writes on, never waiting: take the answer to the write under way if it has
        come, then send what is outgoing, unless Redis is backing off or a :meth:`quiet` section
        holds the writes. Runs after each round and when the store answers (the event loop
        watches it meanwhile), so a write starts as soon as the one before it is answered,
        whatever the model is busy with."""
        try:
            while True:
                if self._sent is not None:
                    if not self.store.answered():
                        self._watch()
                        return
                    self._finish()
                if self._quiet or time.monotonic() < self._retry_at or not (self._outgoing or self._items):
                    self._unwatch()  # nothing under way: nothing to watch for
                    return
                self._send()
        except Exception as exc:  # a bug, or the store process gone: not Redis being away
            self._unwatch()
            self.on_bug(exc)

    def _watch(self) -> None:
        if not self._watching:
            asyncio.get_running_loop().add_reader(self.store.fileno(), self._pump)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_reader(self.store.fileno())
            self._watching = False

    def _send(self) -> None:
        """Hand the outgoing lists, and a chunk of the catalogue items, to the store."""
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
        self._sent = (stamps, time.time())
        self._answered.clear()
        self.store.send(list(self._items_in_flight.values()), lists)

    def _finish(self) -> None:
        """The store answered the write under way: count it, or keep its lists and items pending
        when Redis was away."""
        assert self._sent is not None
        (stamps, started), self._sent = self._sent, None
        self._answered.set()
        lists = list(self._in_flight.values())
        stored = len(self._items_in_flight)
        try:
            written = self.store.answer()
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
                events = np.frombuffer(ranked).reshape(-1, _RANKED)[:, :_LEARNED]
                self._stamps.extend(events.ravel())
                self._stamp_users.extend([""] * len(events))  # (ranked in the retry's first chunk)
            self._outgoing, self._outgoing_stamps = {}, array("d")
            self._items = {**self._items_in_flight, **self._items}
            return
        finally:
            self._in_flight, self._items_in_flight = {}, {}
            self._count_unstored()
            self.on_change()
        self._failures, self._retry_at = 0, 0.0
        self.metrics.catalogue_items_stored.inc(stored)
        events = np.frombuffer(stamps).reshape(-1, _RANKED)
        # The split first: a scrape that finds every event's latency counted finds its split too.
        self.metrics.slowest_events.add(np.column_stack([events, np.full(len(events), written)]))
        for ts in events[:, 0].tolist():
            self.metrics.event_to_list.observe(max(0.0, written - ts))
        self.metrics.list_refreshes.inc(len(lists))
        self.metrics.away_lists.inc(sum(top.away for top in lists))

    def close(self) -> None:
        """End the store process (after the last flush; a write under way is finished first)."""
        self._unwatch()
        self.store.close()
