"""The worker's Redis side: users whose refreshed list is not in Redis yet, re-ranked and written
in one call per chunk. An outage (Redis unreachable, or answering with an error: over maxmemory,
read-only, ...) keeps them pending instead of losing them, and the writes back off meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Iterable

from infra.metrics import Metrics
from infra.store import REDIS_UNAVAILABLE, RedisTopNStore, redis_error_kind
from online_models.pipeline import RefreshPipeline

log = logging.getLogger("pushrec.worker")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0


class ListWriter:
    """Pending users (and their events' record times, for the latency histogram) until written."""

    def __init__(self, store: RedisTopNStore, pipeline: RefreshPipeline, metrics: Metrics) -> None:
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.unwritten: dict[str, None] = {}
        self._sent_at = array("d")
        self.lock = asyncio.Lock()  # held while writing: a write never lands after a forget
        self._failures = 0  # consecutive failed writes
        self._retry_at = 0.0  # monotonic time before which no write is tried

    def add(self, users: Iterable[str], sent_at: Iterable[float]) -> None:
        """These users' lists changed (their events were produced at ``sent_at``)."""
        self.unwritten.update(dict.fromkeys(users))
        self._sent_at.extend(sent_at)

    async def write(self) -> None:
        """Re-rank and store every user whose list has not reached Redis yet.

        Redis connection errors are retried with backoff by the client; if they persist, or
        Redis answers with an error, the users stay pending and the next write is tried after a
        backoff (1 s doubling to 30 s) by a later batch or the retry timer, so an outage delays
        lists but neither loses them, nor crash-loops the worker, nor holds up every batch for
        the client's retries.
        """
        if time.monotonic() < self._retry_at:
            return
        async with self.lock:
            await self._write()

    async def _write(self) -> None:
        if not self.unwritten:
            return
        # Take the pending set before awaiting: a batch learned meanwhile adds to a fresh one.
        users, self.unwritten = self.unwritten, {}
        sent_at, self._sent_at = self._sent_at, array("d")
        lists = self.pipeline.refresh(list(users))
        try:
            await self.store.write_lists(lists, time.time())
        except REDIS_UNAVAILABLE as exc:
            self.metrics.redis_errors.labels(redis_error_kind(exc)).inc()
            backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**self._failures)
            self._failures += 1
            self._retry_at = time.monotonic() + backoff
            log.error(
                "Redis write failed (%s), %d lists pending, next try in %.0f s: %s",
                redis_error_kind(exc),
                len(users),
                backoff,
                exc,
            )
            self.unwritten.update(users)
            self._sent_at.extend(sent_at)
            return
        self._failures, self._retry_at = 0, 0.0
        written = time.time()
        for ts in sent_at:
            self.metrics.event_to_list.observe(max(0.0, written - ts))
        self.metrics.list_refreshes.inc(len(lists))
