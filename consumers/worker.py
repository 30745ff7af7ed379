"""The worker agent: decode each record, learn from it, refresh the touched users' lists in Redis.

Several workers may share the consumer group: topics are keyed by user, so each user's events
(and list) belong to one worker. Item factors are learned by each worker from its own users;
sharing them between workers is the job of a future item-factor sync behind
``RefreshPipeline.recommender`` and is not done here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from array import array
from collections import Counter
from collections.abc import Sequence

import faust
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, connect
from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender
from stream.app import make_app, raw_topic
from stream.deadletter import dead_letter_headers
from stream.events import EVENT_TYPES, BadEvent, Event, Reason, decode_event
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger("pushrec.worker")


def build_recommender(settings: Settings) -> Recommender:
    """The product model as configured (the worker's and `pushrec evaluate`'s ``pushrec``)."""
    return Recommender(**settings.model.model_dump(exclude={"hit_rate_window"}))


def build_pipeline(settings: Settings) -> RefreshPipeline:
    """The pure core the worker drives (also used by in-process replays)."""
    return RefreshPipeline(build_recommender(settings), settings.model.hit_rate_window)


class RefreshWorker:
    """Owns the Faust app, its agent, the Redis store and the metrics of one worker process."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        redis_url: str,
        metrics: Metrics | None = None,
        until_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.names = TopicNames(settings.kafka.topic_prefix)
        self.metrics = metrics or Metrics(EVENT_TYPES, tuple(r.value for r in Reason))
        self.pipeline = build_pipeline(settings)
        self.store = RedisTopNStore(
            connect(redis_url, settings.redis.retries),
            Keys(settings.redis.key_prefix),
            settings.redis.stream_maxlen,
        )
        self.until_idle_s = until_idle_s
        self.app = make_app(settings, bootstrap)
        self.dead_letter_topic = raw_topic(self.app, self.names.dead_letter)
        events = raw_topic(self.app, *self.names.all_events)
        self.app.agent(events, name="pushrec.refresh")(self._agent)
        self.app.timer(0.5)(self._watch_idle)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self._last_activity = time.monotonic()
        # Users whose refreshed list is not in Redis yet, and the record times of their events.
        self._unwritten: dict[str, None] = {}
        self._unwritten_sent_at = array("d")
        self._write_lock = asyncio.Lock()
        self.app.timer(1.0)(self.write_unwritten)

    async def _agent(self, stream: faust.StreamT) -> None:
        worker = self.settings.worker
        async for batch in stream.take_events(worker.batch_max, within=worker.batch_within_s):
            await self.handle_batch(batch)

    async def handle_batch(self, batch: Sequence[faust.EventT]) -> None:
        self._last_activity = time.monotonic()
        limits = self.settings.events
        good: list[Event] = []
        sent_at: list[float] = []
        processed: Counter[str] = Counter()
        for record in batch:
            message = record.message
            kind = self.names.type_of(message.topic)
            try:
                event = decode_event(
                    record.value,
                    max_payload_bytes=limits.max_payload_bytes,
                    max_id_length=limits.max_id_length,
                    expected_type=kind,
                )
            except BadEvent as bad:
                await self._dead_letter(record, kind, bad)
                continue
            good.append(event)
            sent_at.append(message.timestamp or time.time())
            processed[kind] += 1
        self.metrics.batch_size.observe(len(batch))
        if good:
            started = time.perf_counter()
            users = self.pipeline.learn(good)
            self.metrics.model_update.observe(time.perf_counter() - started)
            for kind, count in processed.items():
                self.metrics.events.labels(kind, "processed").inc(count)
            self.metrics.hit_rate.set(self.pipeline.hit_rate.value)
            self._unwritten.update(dict.fromkeys(users))
            self._unwritten_sent_at.extend(sent_at)
        await self.write_unwritten()

    async def write_unwritten(self) -> None:
        """Re-rank and store every user whose list has not reached Redis yet.

        Redis connection errors are retried with backoff by the client; if they persist, the
        users stay pending and are written by the next batch or the retry timer, so an outage
        delays lists but neither loses them nor crash-loops the agent.
        """
        async with self._write_lock:
            if not self._unwritten:
                return
            # Take the pending set before awaiting: a batch learned meanwhile adds to a fresh one.
            users, self._unwritten = self._unwritten, {}
            sent_at, self._unwritten_sent_at = self._unwritten_sent_at, array("d")
            lists = self.pipeline.refresh(list(users))
            try:
                await self.store.write_lists(lists, time.time())
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self.metrics.redis_errors.inc()
                log.error("Redis write failed after retries, %d lists pending: %s", len(users), exc)
                self._unwritten.update(users)
                self._unwritten_sent_at.extend(sent_at)
                return
            written = time.time()
            for ts in sent_at:
                self.metrics.event_to_list.observe(max(0.0, written - ts))
            self.metrics.list_refreshes.inc(len(lists))

    async def _dead_letter(self, record: faust.EventT, kind: str, bad: BadEvent) -> None:
        message = record.message
        await self.dead_letter_topic.send(
            key=message.key,
            value=record.value,
            headers=dead_letter_headers(
                bad.reason, bad.detail, message.topic, message.partition, message.offset
            ),
        )
        self.metrics.dead_letters.labels(bad.reason.value).inc()
        self.metrics.events.labels(kind, "dead_letter").inc()
        log.warning(
            "dead-lettered topic=%s partition=%s offset=%s reason=%s detail=%s",
            message.topic,
            message.partition,
            message.offset,
            bad.reason.value,
            bad.detail,
        )

    async def _on_assigned(self, sender: object, assigned: set, **_: object) -> None:
        owned = [tp for tp in assigned if tp.topic in self.names.all_events]
        self.metrics.assigned_partitions.set(len(owned))
        log.info("assigned %d event partitions", len(owned))

    async def _watch_idle(self) -> None:
        if self.until_idle_s is None or not self.app.consumer.assignment() or self._unwritten:
            # Idle time counts once we own partitions and every list has reached Redis.
            self._last_activity = time.monotonic()
            return
        idle = time.monotonic() - self._last_activity
        if idle >= self.until_idle_s:
            log.info("idle for %.1fs: stopping (--until-idle)", idle)
            self.until_idle_s = None
            os.kill(os.getpid(), signal.SIGTERM)  # the same clean path as an operator's SIGTERM

    def run(self, metrics_port: int | None = None) -> None:
        """Create missing topics, serve /metrics, run Faust until stopped (never returns)."""
        kafka = self.settings.kafka
        ensure_topics(self.bootstrap, self.names.all, kafka.partitions, kafka.replication_factor)
        if metrics_port is not None:
            self.metrics.serve(metrics_port)
        log.info(
            "worker starting: kafka=%s group=%s topics=%s metrics_port=%s",
            self.bootstrap,
            kafka.consumer_group,
            ",".join(self.names.all_events),
            metrics_port,
        )
        faust.Worker(self.app, loglevel=self.settings.log_level, quiet=True).execute_from_commandline()
