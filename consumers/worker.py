"""The worker agent: decode each record, learn from it, refresh the touched users' lists in Redis.

Several workers may share the consumer group: topics are keyed by user, so each user's events
(and list) belong to one worker. Item factors are learned by each worker from its own users;
sharing them between workers is the job of a future item-factor sync behind
``RefreshPipeline.recommender`` and is not done here.

Delivery is at-least-once; effects are made idempotent here. Every record's offset and event id
are remembered with the model: a record below the model's offset for its partition, or an event
id already seen there, is counted as a duplicate and not learned again. The model, those offsets
and the id memory are checkpointed together (periodically, on partition revocation and on stop);
a restarted worker restores the checkpoint and first re-learns, straight from Kafka, any records
between the checkpoint's offsets and the group's committed offsets, so no event is lost or
learned twice whatever Faust committed before a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.checkpoint import CheckpointStore, DiskCheckpoints, RedisCheckpoints, pack, unpack
from infra.faults import fail_point
from infra.kafka import KafkaAccess
from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, connect
from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender
from stream.app import make_app, raw_topic
from stream.deadletter import dead_letter_headers
from stream.dedupe import SeenEventIds
from stream.events import EVENT_TYPES, BadEvent, Event, Item, Reason, decode_event, decode_item
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger("pushrec.worker")
EXIT_BUG = 70  # EX_SOFTWARE: the worker met an unexpected exception and stopped without a checkpoint


def build_recommender(settings: Settings) -> Recommender:
    """The product model as configured (the worker's and `pushrec evaluate`'s ``pushrec``)."""
    return Recommender(**settings.model.model_dump(exclude={"hit_rate_window"}))


def build_pipeline(settings: Settings) -> RefreshPipeline:
    """The pure core the worker drives (also used by in-process replays)."""
    return RefreshPipeline(build_recommender(settings), settings.model.hit_rate_window)


def checkpoint_store(settings: Settings, redis: object) -> CheckpointStore | None:
    """The configured checkpoint store (``redis`` is an asyncio client), or None when off."""
    conf = settings.checkpoint
    name = conf.name or settings.kafka.consumer_group
    if conf.store == "disk":
        return DiskCheckpoints(Path(settings.state_dir) / "checkpoints" / f"{name}.npz")
    if conf.store == "redis":
        return RedisCheckpoints(redis, Keys(settings.redis.key_prefix).checkpoint(name))  # type: ignore[arg-type]
    return None


def pack_state(
    pipeline: RefreshPipeline, seen: SeenEventIds, offsets: dict[str, int], unwritten: Iterable[str]
) -> bytes:
    """The checkpoint blob: model, offsets, event-id memory and users whose list is pending."""
    model_meta, arrays = pipeline.recommender.state()
    meta = {
        "offsets": offsets,
        "seen": seen.state(),
        "unwritten": list(unwritten),
        "model": model_meta,
        "saved_at": time.time(),
    }
    return pack(meta, arrays)


def unpack_state(
    blob: bytes, pipeline: RefreshPipeline, seen: SeenEventIds
) -> tuple[dict[str, int], list[str]]:
    """Load a checkpoint blob into ``pipeline`` and ``seen``; return its offsets and pending users."""
    meta, arrays = unpack(blob)
    pipeline.recommender.restore(meta["model"], arrays)
    seen.restore(meta["seen"])
    return dict(meta["offsets"]), list(meta["unwritten"])


def erase_user(
    pipeline: RefreshPipeline, seen: SeenEventIds, unwritten: dict[str, None], user: str
) -> dict[str, Any]:
    """Erase ``user`` from the model, the event-id memory and the pending lists; what was removed."""
    return {
        "model": pipeline.forget(user),
        "dedupe_ids": seen.forget(user),
        "pending_list": unwritten.pop(user, None) is not None,
    }


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, whether Faust or the catch-up reader fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float | None  # seconds

    @property
    def source(self) -> str:
        return f"{self.topic}:{self.partition}"


class RefreshWorker:
    """Owns the Faust app, its agent, the Redis store and the metrics of one worker process."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaAccess,
        redis_url: str,
        metrics: Metrics | None = None,
        until_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.redis_url = redis_url
        self.names = TopicNames(settings.kafka.topic_prefix)
        self.keys = Keys(settings.redis.key_prefix)
        self.metrics = metrics or Metrics(EVENT_TYPES, tuple(r.value for r in Reason))
        self.pipeline = build_pipeline(settings)
        self.store = self._new_store()
        self.seen = SeenEventIds(settings.checkpoint.dedupe_ids)
        # Next offset to learn per "topic:partition": everything below is in the model.
        self.offsets: dict[str, int] = {}
        self.until_idle_s = until_idle_s
        self.app = make_app(settings, kafka)
        self.dead_letter_topic = raw_topic(self.app, self.names.dead_letter)
        # One agent for events and the catalogue: one order of effects on the model, one offset map.
        self.consumed_topics = [*self.names.all_events, self.names.items]
        events = raw_topic(self.app, *self.consumed_topics)
        self.app.agent(events, name="pushrec.refresh")(self._agent)
        self.app.timer(0.5)(self._watch_idle)
        self.app.timer(1.0)(self.write_unwritten)
        self.app.timer(1.0)(self.apply_forget_requests)
        self.app.timer(settings.checkpoint.every_s)(self.save_checkpoint)
        self.app.timer(2.0)(self._export_lag)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._on_shutdown)
        self._last_activity = time.monotonic()
        # Users whose refreshed list is not in Redis yet, and the record times of their events.
        self._unwritten: dict[str, None] = {}
        self._unwritten_sent_at = array("d")
        self._write_lock = asyncio.Lock()

    def _new_store(self) -> RedisTopNStore:
        client = connect(self.redis_url, self.settings.redis.retries)
        return RedisTopNStore(client, self.keys, self.settings.redis.stream_maxlen)

    @property
    def checkpoints(self) -> CheckpointStore | None:
        return checkpoint_store(self.settings, self.store.client)

    async def _agent(self, stream: faust.StreamT) -> None:
        worker = self.settings.worker
        async for batch in stream.take_events(worker.batch_max, within=worker.batch_within_s):
            records = []
            for event in batch:
                m = event.message
                records.append(Record(m.topic, m.partition, m.offset, m.key, event.value, m.timestamp))
            try:
                await self.handle_records(records)
            except Exception:
                # A bug, not bad input (that is dead-lettered). Faust would restart the agent and
                # the batch would be gone; the model may hold half of it. Exit without a
                # checkpoint instead: the restart restores the last one and re-reads the rest
                # from Kafka, so nothing is lost (and a poison record crash-loops visibly).
                log.critical(
                    "unexpected error on a batch of %d records; exiting (code %d) without a checkpoint "
                    "so that a restart re-reads it from Kafka",
                    len(records),
                    EXIT_BUG,
                    exc_info=True,
                )
                logging.shutdown()
                os._exit(EXIT_BUG)

    async def handle_records(self, records: Sequence[Record], dead_letter: bool = True) -> None:
        """Decode, dead-letter the bad, skip what the model already holds, learn the rest.

        ``dead_letter=False`` for the catch-up after a restart: those records were fully handled
        before the crash, only the model forgot them.
        """
        self._last_activity = time.monotonic()
        limits = self.settings.events
        decoded: list[tuple[Record, Event | None]] = []
        catalogue = [r for r in records if r.topic == self.names.items]
        if catalogue:
            await self.handle_items(catalogue, dead_letter)
            records = [r for r in records if r.topic != self.names.items]
        for record in records:
            kind = self.names.type_of(record.topic)
            try:
                event = decode_event(
                    record.value,
                    max_payload_bytes=limits.max_payload_bytes,
                    max_id_length=limits.max_id_length,
                    expected_type=kind,
                )
            except BadEvent as bad:
                if dead_letter and not self._held(record):
                    await self._dead_letter(record, kind, bad)
                event = None
            decoded.append((record, event))
        # No await from here to the learning: model, offsets and id memory change together.
        good: list[Event] = []
        sent_at: list[float] = []
        processed: Counter[str] = Counter()
        duplicates: Counter[str] = Counter()
        for record, event in decoded:
            already_learned = self._held(record)
            self._advance(record)
            if event is None:
                continue
            if already_learned or self.seen.check_and_add(record.source, event.event_id, event.user_id):
                duplicates[event.type] += 1
                continue
            good.append(event)
            sent_at.append(record.timestamp or time.time())
            processed[event.type] += 1
        self.metrics.batch_size.observe(len(records))
        for kind, count in duplicates.items():
            self.metrics.events.labels(kind, "duplicate").inc(count)
        if good:
            started = time.perf_counter()
            fail_point("worker.learn")
            users = self.pipeline.learn(good)
            self.metrics.model_update.observe(time.perf_counter() - started)
            for kind, count in processed.items():
                self.metrics.events.labels(kind, "processed").inc(count)
            self.metrics.hit_rate.set(self.pipeline.hit_rate.value)
            self._unwritten.update(dict.fromkeys(users))
            self._unwritten_sent_at.extend(sent_at)
        await self.write_unwritten()

    def _held(self, record: Record) -> bool:
        """Whether the model already holds this record (its offset is below the partition's next)."""
        return record.offset < self.offsets.get(record.source, 0)

    def _advance(self, record: Record) -> None:
        self.offsets[record.source] = max(self.offsets.get(record.source, 0), record.offset + 1)

    async def handle_items(self, records: Sequence[Record], dead_letter: bool = True) -> None:
        """Catalogue records: store each item in Redis and let the model embed the new or changed
        ones (one batch). Announcing an item twice changes nothing, so redelivery is harmless."""
        limits = self.settings.events
        items: list[Item] = []
        for record in records:
            try:
                items.append(
                    decode_item(
                        record.value,
                        max_payload_bytes=limits.max_payload_bytes,
                        max_id_length=limits.max_id_length,
                    )
                )
            except BadEvent as bad:
                if dead_letter and not self._held(record):
                    await self._dead_letter(record, None, bad)
        # No await from here to the model: the offsets and the catalogue change together (an
        # offset advanced across an await could reach a checkpoint before its item does).
        for record in records:
            self._advance(record)
        if not items:
            return
        started = time.perf_counter()
        embedded = self.pipeline.recommender.add_items(
            [i.item_id for i in items], [i.title for i in items], [i.category for i in items]
        )
        self.metrics.catalogue_items.labels("embedded").inc(embedded)
        self.metrics.catalogue_items.labels("unchanged").inc(len(items) - embedded)
        log.info(
            "catalogue: %d item(s), %d embedded in %.2fs", len(items), embedded, time.perf_counter() - started
        )
        try:
            await self.store.write_items(items)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.metrics.redis_errors.inc()
            log.error("Redis write of %d catalogue item(s) failed after retries: %s", len(items), exc)

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

    # --- checkpoints -------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return pack_state(self.pipeline, self.seen, self.offsets, self._unwritten)

    def restore(self, blob: bytes) -> None:
        self.offsets, unwritten = unpack_state(blob, self.pipeline, self.seen)
        self._unwritten.update(dict.fromkeys(unwritten))

    async def save_checkpoint(self) -> None:
        store = self.checkpoints
        if store is None:
            return
        try:
            await store.save(self.snapshot())
        except (OSError, RedisConnectionError, RedisTimeoutError) as exc:
            self.metrics.checkpoints.labels("failed").inc()
            log.error("checkpoint to %s failed: %s", store.where, exc)
            return
        self.metrics.checkpoints.labels("ok").inc()
        self.metrics.checkpoint_time.set(time.time())
        log.debug("checkpoint saved to %s", store.where)

    async def restore_and_catch_up(self) -> None:
        """Before Faust starts: load the checkpoint, re-learn what it missed, write pending lists."""
        store = self.checkpoints
        if store is None:
            log.warning("checkpoints are off: the model starts empty at the committed offsets")
            return
        blob = await store.load()
        if blob is None:
            log.info("no checkpoint at %s: the model starts empty", store.where)
        else:
            self.restore(blob)
            log.info(
                "restored checkpoint from %s: %d users, %d items, offsets %s",
                store.where,
                self.pipeline.recommender.n_users,
                len(self.pipeline.recommender.items),
                self.offsets,
            )
        gap = await asyncio.to_thread(self._read_gap)
        batch_max = self.settings.worker.batch_max
        for start in range(0, len(gap), batch_max):
            await self.handle_records(gap[start : start + batch_max], dead_letter=False)
        if gap:
            log.info("caught up %d records the group committed but the model did not hold", len(gap))
        await self.apply_forget_requests()
        await self.write_unwritten()

    def _read_gap(self) -> list[Record]:
        """Records the group committed but the model does not hold, in offset order per partition:
        from the checkpoint's offset (the partition's first retained one if the checkpoint does
        not know it) up to the committed offset."""
        from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

        group = self.settings.kafka.consumer_group
        admin = KafkaAdminClient(**self.kafka.client_options(), client_id="pushrec-catch-up")
        try:
            committed = admin.list_group_offsets({group: None}).get(group, {})
        finally:
            admin.close()
        ends = {
            TopicPartition(tp.topic, tp.partition): meta.offset
            for tp, meta in committed.items()
            if tp.topic in self.consumed_topics and meta.offset > 0
        }
        if not ends:
            return []
        consumer = KafkaConsumer(**self.kafka.client_options(), enable_auto_commit=False)
        records: list[Record] = []
        try:
            first = consumer.beginning_offsets(list(ends))
            starts = {tp: self.offsets.get(f"{tp.topic}:{tp.partition}", first[tp]) for tp in ends}
            remaining = {tp for tp in ends if ends[tp] > starts[tp]}
            consumer.assign(list(remaining))
            for tp in remaining:
                consumer.seek(tp, starts[tp])
            while remaining:
                polled = consumer.poll(timeout_ms=5000)
                if not polled:
                    raise RuntimeError(f"catch-up stalled before the committed offsets of {remaining}")
                for tp, messages in polled.items():
                    for m in messages:
                        if m.offset < ends[tp]:
                            ts = m.timestamp / 1000 if m.timestamp else None
                            records.append(Record(m.topic, m.partition, m.offset, m.key, m.value, ts))
                    if messages and messages[-1].offset >= ends[tp] - 1:
                        remaining.discard(tp)
                        consumer.pause(tp)
        finally:
            consumer.close()
        return records

    # --- forgetting ----------------------------------------------------------------------------

    async def apply_forget_requests(self) -> None:
        """Erase users named on the forget stream from the model, id memory and pending lists;
        checkpoint; then replace each request by its result (counts only, no user id)."""
        client, requests = self.store.client, self.keys.forget_requests()
        try:
            entries = await client.xrange(requests)
        except (RedisConnectionError, RedisTimeoutError):
            return
        if not entries:
            return
        results = {}
        for entry_id, fields in entries:
            user = fields[b"user"].decode()
            results[entry_id.decode()] = erase_user(self.pipeline, self.seen, self._unwritten, user)
        await self.save_checkpoint()
        async with client.pipeline(transaction=True) as pipe:
            for request_id, result in results.items():
                pipe.set(self.keys.forget_result(request_id), orjson.dumps(result), ex=3600)
            pipe.xdel(requests, *results)
            await pipe.execute()
        log.info("applied %d forget request(s)", len(results))

    # --- Faust hooks ---------------------------------------------------------------------------

    async def _dead_letter(self, record: Record, kind: str | None, bad: BadEvent) -> None:
        await self.dead_letter_topic.send(
            key=record.key,
            value=record.value,
            headers=dead_letter_headers(
                bad.reason, bad.detail, record.topic, record.partition, record.offset
            ),
        )
        self.metrics.dead_letters.labels(bad.reason.value).inc()
        if kind is None:
            self.metrics.catalogue_items.labels("dead_letter").inc()
        else:
            self.metrics.events.labels(kind, "dead_letter").inc()
        log.warning(
            "dead-lettered topic=%s partition=%s offset=%s reason=%s detail=%s",
            record.topic,
            record.partition,
            record.offset,
            bad.reason.value,
            bad.detail,
        )

    async def _on_assigned(self, sender: object, assigned: set, **_: object) -> None:
        owned = [tp for tp in assigned if tp.topic in self.names.all_events]
        self.metrics.assigned_partitions.set(len(owned))
        log.info("assigned %d event partitions", len(owned))

    async def _export_lag(self) -> None:
        consumer = self.app.consumer
        lag = 0
        for tp in consumer.assignment():
            if tp.topic in self.names.all_events:
                end = consumer.highwater(tp)
                if end is not None and end >= 0:
                    lag += max(0, end - self.offsets.get(f"{tp.topic}:{tp.partition}", 0))
        self.metrics.consumer_lag.set(lag)

    async def _on_revoked(self, sender: object, revoked: set, **_: object) -> None:
        if any(tp.topic in self.names.all_events for tp in revoked):
            await self.save_checkpoint()

    async def _on_shutdown(self, sender: object, **_: object) -> None:
        await self.write_unwritten()
        await self.save_checkpoint()

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
        """Create missing topics, restore, serve /metrics, run Faust until stopped (never returns)."""
        kafka = self.settings.kafka
        ensure_topics(self.kafka, self.names.all, kafka.partitions, kafka.replication_factor)
        if metrics_port is not None:
            self.metrics.serve(metrics_port)
        asyncio.run(self._before_faust())
        log.info(
            "worker starting: kafka=%s group=%s topics=%s metrics_port=%s",
            self.kafka,
            kafka.consumer_group,
            ",".join(self.names.all_events),
            metrics_port,
        )
        faust.Worker(self.app, loglevel=self.settings.log_level, quiet=True).execute_from_commandline()

    async def _before_faust(self) -> None:
        try:
            await self.restore_and_catch_up()
        finally:
            # Connections belong to this event loop; Faust runs its own.
            await self.store.client.aclose()
            self.store = self._new_store()
