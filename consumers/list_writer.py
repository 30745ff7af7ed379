"""The worker's Redis side: users whose refreshed list is not in Redis yet, re-ranked and written
in one call per chunk; an outage keeps them pending instead of losing them."""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Iterable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.metrics import Metrics
from infra.store import RedisTopNStore
from online_models.pipeline import RefreshPipeline

log = logging.getLogger("pushrec.worker")


class ListWriter:
    """Pending users (and their events' record times, for the latency histogram) until written."""

    def __init__(self, store: RedisTopNStore, pipeline: RefreshPipeline, metrics: Metrics) -> None:
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.unwritten: dict[str, None] = {}
        self._sent_at = array("d")
        self._lock = asyncio.Lock()

    def add(self, users: Iterable[str], sent_at: Iterable[float]) -> None:
        """These users' lists changed (their events were produced at ``sent_at``)."""
        self.unwritten.update(dict.fromkeys(users))
        self._sent_at.extend(sent_at)

    async def write(self) -> None:
        """Re-rank and store every user whose list has not reached Redis yet.

        Redis connection errors are retried with backoff by the client; if they persist, the
        users stay pending and are written by the next batch or the retry timer, so an outage
        delays lists but neither loses them nor crash-loops the agent.
        """
        async with self._lock:
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
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.metrics.redis_errors.inc()
            log.error("Redis write failed after retries, %d lists pending: %s", len(users), exc)
            self.unwritten.update(users)
            self._sent_at.extend(sent_at)
            return
        written = time.time()
        for ts in sent_at:
            self.metrics.event_to_list.observe(max(0.0, written - ts))
        self.metrics.list_refreshes.inc(len(lists))
