"""The model side of the worker: decode each record, learn from it, refresh the touched users'
lists in Redis, checkpoint. It runs in its own process beside the Faust consumer
(``consumers/ingest.py``), which forwards every record it is given, in order, over a pipe: the
consumer's work and the model's then use both cores instead of sharing one (measured: 0.35-0.48
of the trivial-agent ceiling in one process).

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
import ctypes
import logging
import os
import pickle
import signal
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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
from stream.deadletter import dead_letter_headers
from stream.dedupe import SeenEventIds
from stream.events import EVENT_TYPES, BadEvent, Event, Item, Reason, decode_event, decode_item
from stream.topics import TopicNames

log = logging.getLogger("pushrec.worker")
EXIT_BUG = 70  # EX_SOFTWARE: the worker met an unexpected exception and stopped without a checkpoint

# What the Faust process sends the model process: (kind, payload) pickled, in order.
RECORDS = "records"  # payload: [(topic, partition, offset, key, value, timestamp s), ...]
ASSIGNED = "assigned"  # payload: number of event partitions the group gave this worker
HIGHWATER = "highwater"  # payload: {"topic:partition": next offset the broker will write}
CHECKPOINT = "checkpoint"  # partitions are being revoked: checkpoint now, then answer DONE
STOP = "stop"  # write pending lists, checkpoint, answer DONE and exit
# What the model process answers.
READY = "ready"  # restored and caught up: Faust may start
DONE = "done"
PENDING = "pending"  # payload: whether some refreshed lists are not in Redis yet (sent on change)


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
    """Owns the model, the Redis store, the checkpoints and the metrics of one worker: the model
    process (:meth:`serve` reads what the Faust process forwards)."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaAccess,
        redis_url: str,
        metrics: Metrics | None = None,
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
        # Events and the catalogue in one stream: one order of effects on the model, one offset map.
        self.consumed_topics = [*self.names.all_events, self.names.items]
        self._producer: Any = None  # kafka-python, made on the first dead letter
        # Users whose refreshed list is not in Redis yet, and the record times of their events.
        self._unwritten: dict[str, None] = {}
        self._unwritten_sent_at = array("d")
        self._write_lock = asyncio.Lock()
        self._reported_pending = False
        # The pipes to the Faust process (set by serve; no inbox until caught up).
        self._inbox: Connection | None = None
        self._outbox: Connection | None = None
        # Behind (more records already waiting), a user touched in consecutive batches is
        # re-ranked once per REFRESH_MAX_DELAY_S instead of once per batch: the backlog drains
        # sooner and no list waits longer than that (plus one batch).
        self._pending_since = 0.0
        self._refresh_max_delay_s = settings.worker.refresh_max_delay_s

    def _new_store(self) -> RedisTopNStore:
        client = connect(self.redis_url, self.settings.redis.retries)
        return RedisTopNStore(client, self.keys, self.settings.redis.stream_maxlen)

    @property
    def checkpoints(self) -> CheckpointStore | None:
        return checkpoint_store(self.settings, self.store.client)

    # --- the model process ------------------------------------------------------------------

    async def serve(self, inbox: Connection, outbox: Connection) -> None:
        """Restore and catch up, answer READY, then apply what the Faust process sends until STOP.

        Messages are read one at a time, only when the previous one is done: a slow model makes
        the Faust process wait on a full pipe instead of buffering records here."""
        self._outbox = outbox
        await self.restore_and_catch_up()
        self._inbox = inbox
        outbox.send((READY, None))
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(1, thread_name_prefix="pushrec-inbox")
        timers = [
            asyncio.create_task(_every(1.0, self.write_unwritten)),
            asyncio.create_task(_every(1.0, self.apply_forget_requests)),
            asyncio.create_task(_every(self.settings.checkpoint.every_s, self.save_checkpoint)),
        ]
        try:
            while True:
                try:
                    kind, payload = pickle.loads(await loop.run_in_executor(reader, inbox.recv_bytes))
                except EOFError:
                    log.error("the Faust process is gone: stopping without a checkpoint")
                    return
                if kind == RECORDS:
                    await _or_exit(self.handle_records([Record(*fields) for fields in payload]), len(payload))
                elif kind == ASSIGNED:
                    self.metrics.assigned_partitions.set(payload)
                    log.info("assigned %d event partitions", payload)
                elif kind == HIGHWATER:
                    self.export_lag(payload)
                elif kind == CHECKPOINT:
                    await self.save_checkpoint()
                    outbox.send((DONE, None))
                elif kind == STOP:
                    await self.write_unwritten()
                    await self.save_checkpoint()
                    outbox.send((DONE, None))
                    return
        finally:
            for timer in timers:
                timer.cancel()
            reader.shutdown(wait=False)
            if self._producer is not None:
                self._producer.close(timeout=10)
            await self.store.client.aclose()

    def _behind(self) -> bool:
        """More records are already waiting (read only between messages: no reader is waiting)."""
        return self._inbox is not None and self._inbox.poll(0)

    def _report_pending(self) -> None:
        """Tell the Faust process when lists start or stop waiting for Redis (its idle watch)."""
        pending = bool(self._unwritten)
        if pending != self._reported_pending and self._outbox is not None:
            self._outbox.send((PENDING, pending))
            self._reported_pending = pending

    async def handle_records(self, records: Sequence[Record], dead_letter: bool = True) -> None:
        """Decode, dead-letter the bad, skip what the model already holds, learn the rest.

        ``dead_letter=False`` for the catch-up after a restart: those records were fully handled
        before the crash, only the model forgot them.
        """
        limits = self.settings.events.limits
        decoded: list[tuple[Record, Event | None]] = []
        catalogue = [r for r in records if r.topic == self.names.items]
        if catalogue:
            await self.handle_items(catalogue, dead_letter)
            records = [r for r in records if r.topic != self.names.items]
        for record in records:
            kind = self.names.type_of(record.topic)
            try:
                event = decode_event(record.value, limits, expected_type=kind)
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
            refused_before = self.pipeline.recommender.refused_updates
            users = self.pipeline.learn(good)
            self.metrics.model_update.observe(time.perf_counter() - started)
            refused = self.pipeline.recommender.refused_updates - refused_before
            if refused:
                self.metrics.refused_updates.inc(refused)
                log.warning(
                    "%d of %d events' model updates refused: they would have left factors non-finite "
                    "or exploding (see pushrec_model_refused_updates_total)",
                    refused,
                    len(good),
                )
            for kind, count in processed.items():
                self.metrics.events.labels(kind, "processed").inc(count)
            self.metrics.hit_rate.set(self.pipeline.hit_rate.value)
            if not self._unwritten:
                self._pending_since = time.monotonic()
            self._unwritten.update(dict.fromkeys(users))
            self._unwritten_sent_at.extend(sent_at)
        if not self._behind() or time.monotonic() - self._pending_since >= self._refresh_max_delay_s:
            await self.write_unwritten()

    def _held(self, record: Record) -> bool:
        """Whether the model already holds this record (its offset is below the partition's next)."""
        return record.offset < self.offsets.get(record.source, 0)

    def _advance(self, record: Record) -> None:
        self.offsets[record.source] = max(self.offsets.get(record.source, 0), record.offset + 1)

    async def handle_items(self, records: Sequence[Record], dead_letter: bool = True) -> None:
        """Catalogue records: store each item in Redis and let the model embed the new or changed
        ones (one batch). Announcing an item twice changes nothing, so redelivery is harmless."""
        limits = self.settings.events.limits
        items: list[Item] = []
        for record in records:
            try:
                items.append(decode_item(record.value, limits))
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
            await self._write_unwritten()
        self._report_pending()

    async def _write_unwritten(self) -> None:
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
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**self.kafka.client_options(), acks="all")
        sent = self._producer.send(
            self.names.dead_letter,
            key=record.key,
            value=record.value,
            headers=dead_letter_headers(
                bad.reason, bad.detail, record.topic, record.partition, record.offset
            ),
        )
        await asyncio.to_thread(sent.get, 30)  # acknowledged before the offset moves past it
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

    def export_lag(self, highwater: dict[str, int]) -> None:
        """Records the broker holds beyond what the model learned, over the event partitions."""
        lag = 0
        for source, end in highwater.items():
            lag += max(0, end - self.offsets.get(source, 0))
        self.metrics.consumer_lag.set(lag)


async def _every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await _or_exit(job(), None)


async def _or_exit(work: Awaitable[None], records: int | None) -> None:
    """Run ``work``; on an unexpected exception exit the process without a checkpoint.

    A bug, not bad input (that is dead-lettered). The model may hold half a batch: the restart
    restores the last checkpoint and re-reads the rest from Kafka, so nothing is lost (and a
    poison record crash-loops visibly). The Faust process sees this process end and exits too."""
    try:
        await work
    except Exception:
        what = "a periodic job" if records is None else f"a batch of {records} records"
        log.critical(
            "unexpected error on %s; exiting (code %d) without a checkpoint "
            "so that a restart re-reads it from Kafka",
            what,
            EXIT_BUG,
            exc_info=True,
        )
        logging.shutdown()
        os._exit(EXIT_BUG)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the Faust process dies (kill -9 leaves no orphan model
    writing lists or checkpoints beside the restarted worker). Elsewhere: EOF on the pipe."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def model_process(
    settings: Settings,
    kafka: KafkaAccess,
    redis_url: str,
    metrics_port: int | None,
    inbox: Connection,
    outbox: Connection,
) -> None:
    """Entry point of the model process (spawned by ``consumers.ingest``)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the Faust process decides when to stop (STOP)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from threadpoolctl import threadpool_limits

    from infra.logs import setup_logging

    setup_logging(settings)
    # One BLAS thread: the model shares the machine with the Faust process and the broker, and
    # OpenBLAS's spinning threads then slow small products down (a 9k x 256 product took 12 ms
    # instead of 0.6 ms on a busy 2-core machine). `evaluate` keeps numpy's default.
    threadpool_limits(limits=1, user_api="blas")
    worker = RefreshWorker(settings, kafka, redis_url)
    if metrics_port is not None:
        worker.metrics.serve(metrics_port)
    asyncio.run(worker.serve(inbox, outbox))
