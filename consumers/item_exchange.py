"""One item state for the group, over Kafka: every worker publishes the item changes it learns
and applies everyone else's.

Users belong to partitions, items to everybody. Each worker learns item factors and popularity
from its own users' events and, every ``PUSHREC_WORKER__ITEM_SYNC_S``, takes what that learning
changed (factor deltas, popularity counts: additive, so they add up the same in any order) and
publishes it as one record on ``<prefix>.item-deltas``. Every worker reads every partition of
that topic outside the consumer group and adds other workers' records to its item state; its
own it already holds. Each worker thus holds every item, learned from every event, at most one
sync interval plus a read behind (``pushrec_item_state_lag_seconds``). This is the log-based
parameter server of Flink's online MF and Monolith without a separate server: the log is the
sum, and every worker keeps it. The catalogue (``<prefix>.items``) is read the same way, in full,
by every worker: each embeds every item (the worker that owns a catalogue partition in the group
also stores its items in Redis and dead-letters the bad ones).

Neither lost nor applied twice, through crashes and rebalances:

- A record says who wrote it (``writer``: one per process) and its number among that writer's
  (``seq``). A writer's records reach the topic in order (each acknowledged before the next; one
  key, one partition), but a record whose acknowledgement was lost is sent again: the topic may
  hold it twice. A worker holds, per writer, the highest ``seq`` its model holds (``held``: its
  own records, those it applied, those a restored blob held) and passes over any record at or
  below it.
- A record says how far its writer had learned each of its partitions (``through``: next offset
  per ``topic:partition``); every worker remembers the highest per source (``published_through``).
- A checkpoint takes the pending changes into a record at its cut and is stored only once that
  record (and every one before it) is acknowledged: a partition's checkpoint never runs ahead of
  what was published from it. The item blob keeps the read offsets, ``held``, and
  ``published_through`` together with how far this worker had learned each of its sources:
  how far the item changes the blob holds reach, per source, whether or not the record that
  says so lies before the read offsets.
- A worker taking a partition reads the topic to its end first. The records between the
  partition's checkpoint and ``published_through`` are re-learned for the users' sake, but their
  item changes are discarded: the group holds them already. From there on, it publishes as usual.

A worker that lost its partitions without knowing it (a zombie) could still publish; the group's
session timeout bounds that, as it does for its list writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from kafka.errors import KafkaError

from infra.checkpoint import CheckpointError, pack, unpack
from online_models.item_sync import ItemChanges, add_changes, discard_changes, take_changes, track_changes

if TYPE_CHECKING:
    from consumers.worker import RefreshWorker

log = logging.getLogger("pushrec.worker")

# So that a record stays below the broker's default limit (1 MiB), it is published as soon as
# this many item vectors are to share (~90 bytes each: an item's float32 delta, or the start of
# one seeded from its text, and its id) or this many rule additions were learned (at most 12
# bytes each once summed) instead of waiting for the interval.
MAX_ITEMS_PER_RECORD = 4096
MAX_RULES_PER_RECORD = 32768
# How long taking a partition waits for the item-delta topic to be read to its end.
READ_TO_END_S = 60.0


class ItemStateUnavailable(RuntimeError):
    """The item-delta topic could not be read to its end."""


class ItemExchange:
    """This worker's side of the group's item state (see the module docstring)."""

    def __init__(self, worker: RefreshWorker) -> None:
        self.worker = worker
        self.topic = worker.names.item_deltas
        self.catalogue = worker.names.items
        self.sync_s = worker.settings.worker.item_sync_s
        self.instance = uuid.uuid4().hex  # this process: its records are never applied twice here
        self.seq = 0
        self.first_change: float | None = None  # wall time of the first change not taken yet
        # Next offset to read per "topic:partition" of the item-delta and catalogue topics.
        self.read_offsets: dict[str, int] = {}
        self.published_through: dict[str, int] = {}
        self.held: dict[str, int] = {}  # per writer, the highest seq of its records this model holds
        # Per source of a taken partition: the offset up to which its last owner published item
        # changes that this model's checkpoint does not hold (see the module docstring).
        self.published_ahead: dict[str, int] = {}
        self._unsent: list[tuple[int, bytes]] = []  # (seq, record) taken, in order, not acknowledged
        self._sending = asyncio.Lock()
        self._reading = asyncio.Lock()
        self._producer: Any = None
        self._consumer: Any = None
        self._publishing: asyncio.Task[None] | None = None
        self._last_lag = 0.0  # age of the last other worker's changes applied
        self._caught_up_at = time.monotonic()
        if self.on:
            track_changes(worker.pipeline.recommender)

    @property
    def on(self) -> bool:
        return self.sync_s > 0

    # --- the checkpoint ------------------------------------------------------------------------

    def cut(self) -> dict[str, Any]:
        """At a checkpoint's cut: take the pending changes (the blobs are stored once they are
        published: :meth:`flush`); what the item blob keeps."""
        self.take()
        through = dict(self.published_through)
        for source, offset in self.worker.offsets.items():  # this worker's learning, in the blob
            through[source] = max(through.get(source, 0), offset)
        return {
            "read_offsets": dict(self.read_offsets),
            "held": dict(self.held),
            "published_through": through,
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.read_offsets = dict(state["read_offsets"])
        self.published_through = dict(state.get("published_through", {}))
        if "held" in state:
            self.held = dict(state["held"])
        else:  # a blob of before 2026-12-04: the records it held beyond its read offsets
            for writer, seq in state.get("skip", ()):
                self.held[writer] = max(self.held.get(writer, 0), seq)

    # --- publishing ----------------------------------------------------------------------------

    def learned(self) -> None:
        """The model just learned: the changes' age counts from the first of them."""
        if self.first_change is None:
            self.first_change = time.time()

    def take(self) -> None:
        """Take the changes learned since the last take into a record to publish (no await)."""
        if not self.on:
            return
        change = take_changes(self.worker.pipeline.recommender)
        first_change, self.first_change = self.first_change, None
        if not change:
            return
        self.seq += 1
        meta = {
            "writer": self.instance,
            "seq": self.seq,
            "through": dict(self.worker.offsets),
            "ids": change.ids,
            "rules_t_ref": change.rules_t_ref,
            "first_change": first_change or time.time(),
        }
        # float32 on the wire: a delta's rounding (~1e-7 of it) is far below what learning moves;
        # positions in ``ids`` as int32.
        arrays = change.arrays()
        arrays["deltas"] = arrays["deltas"].astype(np.float32)
        arrays["starts"] = arrays["starts"].astype(np.float32)  # float32 predictions already
        arrays["rule_values"] = arrays["rule_values"].astype(np.float32)
        for name in ("deltas_at", "starts_at", "counts_at", "rules_at", "purchases_at"):
            arrays[name] = arrays[name].astype(np.int32)
        self._unsent.append((self.seq, pack(meta, arrays)))
        self.held[self.instance] = self.seq

    def full(self) -> bool:
        """So much changed that the record should go now rather than at the interval."""
        recommender = self.worker.pipeline.recommender
        return self.on and (
            recommender.mf.changed_vectors >= MAX_ITEMS_PER_RECORD
            or recommender.covisit.changed_rules >= MAX_RULES_PER_RECORD
        )

    async def flush(self) -> None:
        """Send every record taken, in order, each acknowledged before the next (one record per
        batch: Tansu's ListOffsets counts batches). Raises if the broker does not take them; they
        stay to be sent again."""
        async with self._sending:
            while self._unsent:
                await asyncio.to_thread(self._send, *self._unsent[0])
                self._unsent.pop(0)
                self.worker.metrics.item_deltas.labels("published").inc()

    def _send(self, seq: int, value: bytes) -> None:
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(
                **self.worker.kafka.client_options(),
                acks="all",
                linger_ms=0,
                max_request_size=16 << 20,
                client_id="pushrec-item-deltas",
            )
        # Who wrote it, in headers: a worker passes over its own records without reading them.
        headers = [("writer", self.instance.encode()), ("seq", str(seq).encode())]
        self._producer.send(self.topic, key=self.instance.encode(), value=value, headers=headers).get(30)

    async def publish(self) -> None:
        """Take and send (the periodic job)."""
        self.take()
        try:
            await self.flush()
        except (KafkaError, OSError) as exc:  # the broker is away: kept, sent with the next
            log.warning("item changes not published (%d record(s) kept): %s", len(self._unsent), exc)

    def publish_soon(self) -> None:
        """Take now and send in the background (learning goes on meanwhile)."""
        self.take()
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self.publish())

    # --- reading -------------------------------------------------------------------------------

    def _reader(self) -> Any:
        if self._consumer is None:
            from kafka import KafkaConsumer, TopicPartition

            consumer = KafkaConsumer(
                **self.worker.kafka.client_options(),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                max_partition_fetch_bytes=16 << 20,
                client_id="pushrec-item-state",
            )
            tps = [
                TopicPartition(topic, partition)
                for topic in (self.topic, self.catalogue)
                for partition in sorted(consumer.partitions_for_topic(topic) or {0})
            ]
            consumer.assign(tps)
            for tp in tps:
                offset = self.read_offsets.get(f"{tp.topic}:{tp.partition}")
                if offset is None:
                    consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)
            self._consumer = consumer
        return self._consumer

    async def read(self, timeout_ms: int = 200) -> None:
        """Apply what the topic holds beyond the read offsets (one poll)."""
        async with self._reading:
            consumer = self._reader()
            batches = await asyncio.to_thread(lambda: consumer.poll(timeout_ms=timeout_ms))
            lags = []
            catalogue = []
            for tp, records in batches.items():
                for record in records:
                    self.read_offsets[f"{tp.topic}:{tp.partition}"] = record.offset + 1
                    if tp.topic == self.catalogue:
                        catalogue.append(record.value)
                        continue
                    lag = self._apply(record.value, record.headers)
                    if lag is not None:
                        lags.append(lag)
            if catalogue:
                self.worker.embed_catalogue(catalogue)
            now = time.monotonic()
            if lags:
                self._last_lag = max(lags)
            if self._at_end(consumer):
                self._caught_up_at = now
            # The newest changes' age when applied, or how long the reader has been behind.
            self.worker.metrics.item_state_lag.set(max(self._last_lag, now - self._caught_up_at - 1.0, 0.0))

    def _at_end(self, consumer: Any) -> bool:
        return all(
            consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp)
            for tp in consumer.assignment()
        )

    async def read_to_end(self) -> None:
        """Apply every record the topic holds now (before taking a partition: its published_through)."""
        if not self.on:
            return
        async with self._reading:
            consumer = self._reader()
            ends = await asyncio.to_thread(consumer.end_offsets, list(consumer.assignment()))
        deadline = time.monotonic() + READ_TO_END_S
        while any(self.read_offsets.get(f"{tp.topic}:{tp.partition}", 0) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise ItemStateUnavailable(
                    f"could not read {self.topic} to its end on {self.worker.kafka} within "
                    f"{READ_TO_END_S:.0f}s: without it a partition's item changes could count twice"
                )
            await self.read()

    def _apply(self, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> float | None:
        """One record: its sources' published offsets; another worker's changes into the model.
        Returns the record's age when applied (None: it was this worker's own)."""
        named = dict(headers or ())
        writer, seq = named.get("writer"), named.get("seq")
        if writer and seq and self._held((writer.decode(), int(seq))):  # held already: not even read
            return None
        try:
            meta, arrays = unpack(value)
        except CheckpointError as exc:  # not written by pushrec: nothing to apply
            log.error("%s holds a record that is not an item change, passed over: %s", self.topic, exc)
            self.worker.metrics.item_deltas.labels("unreadable").inc()
            return None
        for source, offset in meta["through"].items():
            if offset > self.published_through.get(source, 0):
                self.published_through[source] = offset
        if self._held((meta["writer"], meta["seq"])):  # a record written without headers
            return None
        change = ItemChanges.from_parts(meta["ids"], meta["rules_t_ref"], arrays)
        add_changes(self.worker.pipeline.recommender, change)
        self.held[meta["writer"]] = meta["seq"]
        self.worker.metrics.item_deltas.labels("applied").inc()
        return max(0.0, time.time() - meta["first_change"])

    def _held(self, key: tuple[str, int]) -> bool:
        """Whether the record ``key`` (writer, seq) is in this model already: this worker's own,
        one applied before (a copy sent again), or one a restored item blob holds."""
        writer, seq = key
        return seq <= self.held.get(writer, 0)

    async def follow(self) -> None:
        """Apply other workers' records as they come (a task of the model process)."""
        while True:
            await self.read()

    # --- taking a partition --------------------------------------------------------------------

    def take_over(self, sources: dict[str, int]) -> dict[str, int]:
        """Sources (``topic:partition`` -> the model's next offset) of partitions just taken: where
        their last owner published beyond (call after :meth:`read_to_end`)."""
        ahead = {
            source: self.published_through[source]
            for source, offset in sources.items()
            if self.published_through.get(source, 0) > offset
        }
        self.published_ahead.update(ahead)
        return ahead

    def passed(self, offsets: dict[str, int]) -> None:
        """Forget what the model has reached."""
        for source in [s for s, o in self.published_ahead.items() if offsets.get(s, 0) >= o]:
            del self.published_ahead[source]

    def discard(self) -> None:
        """Undo the item changes learned since the last take (the group has them)."""
        discard_changes(self.worker.pipeline.recommender)
        self.first_change = None

    def close(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                client.close()
