"""The model side of the worker: decode each record, learn from it, refresh the touched users'
lists in Redis, checkpoint. It runs in its own process beside the Faust consumer
(``consumers/ingest.py``), which forwards every record it is given, in order, over a pipe
(``consumers/model_process.py``): the consumer's work and the model's then use both cores
instead of sharing one (measured: 0.35-0.48 of the trivial-agent ceiling in one process).

Several workers may share the consumer group: topics are keyed by user, so each user's events
(and list) belong to one worker (``consumers/ownership.py``). Items belong to the whole group:
each worker publishes the item changes it learns and applies the others'
(``consumers/item_exchange.py``).

Delivery is at-least-once; effects are made idempotent here. Every record's offset and event id
are remembered with the model: a record below the model's offset for its partition, or an event
id already seen there, is counted as a duplicate and not learned again. The model, those offsets
and the id memory are checkpointed together (``consumers/recovery.py``); the lists are written
by ``consumers/list_writer.py``, dead letters sent by ``consumers/dead_letters.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from multiprocessing.connection import Connection
from typing import NoReturn

import orjson

from consumers.dead_letters import DeadLetters
from consumers.item_exchange import ItemExchange
from consumers.list_store import ListStore
from consumers.list_writer import ListWriter
from consumers.ownership import Ownership
from consumers.protocol import EXIT_BUG, PENDING
from consumers.recovery import erase_user
from infra.faults import fail_point
from infra.kafka import KafkaAccess
from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import REDIS_UNAVAILABLE, Keys, RedisTopNStore, connect
from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender
from stream.dedupe import SeenEventIds
from stream.events import EVENT_TYPES, BadEvent, Event, Item, Reason, decode_event, decode_item
from stream.records import Record
from stream.topics import TopicNames

log = logging.getLogger("pushrec.worker")


def build_recommender(settings: Settings) -> Recommender:
    """The product model as configured (the worker's and `pushrec evaluate`'s ``pushrec``)."""
    return Recommender(**settings.model.model_dump(exclude={"hit_rate_window"}))


def build_pipeline(settings: Settings) -> RefreshPipeline:
    """The pure core the worker drives (also used by in-process replays)."""
    model = settings.model
    return RefreshPipeline(build_recommender(settings), model.hit_rate_window)


class RefreshWorker:
    """Owns the model, the Redis store, the checkpoints and the metrics of one worker (the model
    process; ``consumers.model_process.serve`` feeds it what the Faust process forwards)."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaAccess,
        redis_url: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.names = TopicNames(settings.kafka.topic_prefix)
        self.keys = Keys(settings.redis.key_prefix)
        self.metrics = metrics or Metrics(EVENT_TYPES, tuple(r.value for r in Reason))
        self.pipeline = build_pipeline(settings)
        candidates = self.pipeline.recommender.candidates  # read at each scrape
        self.metrics.index_items.set_function(lambda: candidates.indexed_items)
        self.metrics.index_pending.set_function(lambda: candidates.pending_rows)
        client = connect(redis_url, settings.redis.retries)
        self.store = RedisTopNStore(client, self.keys, settings.redis.stream_maxlen)
        self.lists = ListWriter(
            ListStore(settings, redis_url),
            self.pipeline,
            self.metrics,
            self._report_pending,
            partial(exit_on_bug, "a list write"),
            settings.worker.latency_target_s,
        )
        self.dead_letters = DeadLetters(kafka, self.names.dead_letter, self.metrics)
        self.seen = SeenEventIds(settings.checkpoint.dedupe_ids)
        # Next offset to learn per "topic:partition": everything below is in the model.
        self.offsets: dict[str, int] = {}
        # Events and the catalogue in one stream: one order of effects on the model, one offset map.
        self.consumed_topics = [*self.names.all_events, self.names.items]
        self._reported_pending = False
        # The pipes to the Faust process (set by serve; no inbox until caught up).
        self.inbox: Connection | None = None
        self.outbox: Connection | None = None
        # Behind (more records already waiting), a user touched in consecutive batches is
        # re-ranked once per REFRESH_MAX_DELAY_S instead of once per batch: the backlog drains
        # sooner and no list waits longer than that (plus one batch); sooner when an event's
        # list would otherwise miss LATENCY_TARGET_S (``ListWriter.deadline``). A deferred round
        # has a timer for then, in case no batch comes by then to run it (a pause, the end of a
        # replay, a pipe message that was not records).
        self._pending_since = 0.0
        self._refresh_max_delay_s = settings.worker.refresh_max_delay_s
        self._deferred: asyncio.TimerHandle | None = None
        # When the model last learned (monotonic) and its clock then: with no event for
        # IDLE_CLOCK_S, the clock moves on from there with the wall clock (``_move_idle_clock``).
        self._learned: tuple[float, float] | None = None
        self._idle = False
        self.ownership = Ownership(self)
        self.exchange = ItemExchange(self)

    async def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
        self.dead_letters.close()
        self.exchange.close()
        self.lists.close()
        await self.store.client.aclose()

    def _behind(self) -> bool:
        """More records are already waiting (read only between messages: no reader is waiting)."""
        return self.inbox is not None and self.inbox.poll(0)

    async def handle_records(
        self, records: Sequence[Record], dead_letter: bool = True, read_at: float | None = None
    ) -> None:
        """Decode, dead-letter the bad, skip what the model already holds, learn the rest.

        ``dead_letter=False`` for the catch-up after a restart: those records were fully handled
        before the crash, only the model forgot them. Records of a taken partition whose item
        changes its last owner published already (``exchange.published_ahead``) were handled by
        it too: learned for their users' sake only, their item changes discarded. ``read_at``:
        when the Faust process handed the batch over (``infra.latency``; None: read here).
        """
        got_at = time.time()
        read_at = got_at if read_at is None else read_at
        unowned = {record.partition for record in records} - self.ownership.owned
        if unowned:  # records came before the assignment did: take the partitions first
            await self.ownership.take(unowned)
        ahead = self.exchange.published_ahead
        if ahead:
            handled = [r for r in records if r.offset < ahead.get(r.source, 0)]
            if handled:
                records = [r for r in records if r.offset >= ahead.get(r.source, 0)]
                await self._handle(handled, (read_at, got_at), dead_letter=False, item_effects=False)
            self.exchange.passed(self.offsets)
        if records:
            await self._handle(records, (read_at, got_at), dead_letter)

    async def _handle(
        self,
        records: Sequence[Record],
        arrived: tuple[float, float],
        dead_letter: bool,
        item_effects: bool = True,
    ) -> None:
        """``arrived``: when the batch was read and when this process got it (``infra.latency``)."""
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
                    await self.dead_letters.send(record, kind, bad)
                event = None
            decoded.append((record, event))
        # No await from here to the learning: model, offsets and id memory change together.
        if not item_effects:
            self.exchange.take()  # what was learned before goes out as usual
        good: list[Event] = []
        partitions: list[int] = []
        sent: list[tuple[str, float]] = []  # each event's user and record time
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
            partitions.append(record.partition)
            sent.append((event.user_id, record.timestamp or time.time()))
            processed[event.type] += 1
        self.metrics.batch_size.observe(len(records))
        for kind, count in duplicates.items():
            self.metrics.events.labels(kind, "duplicate").inc(count)
        if good:
            started = time.perf_counter()
            fail_point("worker.learn")
            refused_before = self.pipeline.recommender.refused_updates
            users = self.pipeline.learn(good)
            leaving = self.pipeline.leaving()  # shoppers who left meanwhile: re-ranked as away
            if item_effects:
                self.exchange.learned()
            else:
                self.exchange.discard()
            for event, partition in zip(good, partitions, strict=True):
                self.pipeline.recommender.users.place(event.user_id, partition)
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
            self.metrics.visit_hit_rate.set(self.pipeline.visit_hit_rate.value)
            if not self.lists.unwritten:
                self._pending_since = time.monotonic()
            self.lists.add(users, sent, *arrived, time.time())
            self.lists.add(leaving)
            self._learned, self._idle = (time.monotonic(), self.pipeline.recommender.clock), False
        if not self._behind():
            self._refresh()
        else:  # deferred until the delay ends, or sooner if an event would miss the latency target
            left_s = min(
                self._pending_since + self._refresh_max_delay_s - time.monotonic(),
                self.lists.deadline - time.time(),
            )
            if left_s <= 0:
                self._refresh()
            elif self.lists.unwritten:
                self._refresh_in(left_s)
        if self.exchange.full():
            self.exchange.publish_soon()

    def _held(self, record: Record) -> bool:
        """Whether the model already holds this record (its offset is below the partition's next)."""
        return record.offset < self.offsets.get(record.source, 0)

    def _advance(self, record: Record) -> None:
        self.offsets[record.source] = max(self.offsets.get(record.source, 0), record.offset + 1)

    async def handle_items(self, records: Sequence[Record], dead_letter: bool = True) -> None:
        """Catalogue records of this worker's partitions: store each item in Redis (and, without
        the group's item state, let the model embed them; with it, every worker embeds every item:
        :meth:`embed_catalogue`). Announcing an item twice changes nothing: redelivery is harmless."""
        limits = self.settings.events.limits
        items: list[Item] = []
        for record in records:
            try:
                items.append(decode_item(record.value, limits))
            except BadEvent as bad:
                if dead_letter and not self._held(record):
                    await self.dead_letters.send(record, None, bad)
        # No await from here to the model: the offsets and the catalogue change together (an
        # offset advanced across an await could reach a checkpoint before its item does).
        for record in records:
            self._advance(record)
        if not items:
            return
        if not self.exchange.on:
            self._embed(items)
        self.lists.add_items(items)  # stored in the background; kept through an outage

    def embed_catalogue(self, values: Sequence[bytes]) -> None:
        """The whole catalogue, as every worker reads it (``consumers.item_exchange``): the model
        embeds the new or changed items; the bad ones are dead-lettered by their partition's owner."""
        items = []
        for value in values:
            try:
                items.append(decode_item(value, self.settings.events.limits))
            except BadEvent:
                continue
        if items:
            self._embed(items)

    def _embed(self, items: Sequence[Item]) -> None:
        started = time.perf_counter()
        embedded = self.pipeline.recommender.add_items(
            [i.item_id for i in items], [i.title for i in items], [i.category for i in items]
        )
        self.metrics.catalogue_items.labels("embedded").inc(embedded)
        self.metrics.catalogue_items.labels("unchanged").inc(len(items) - embedded)
        log.info(
            "catalogue: %d item(s), %d embedded in %.2fs", len(items), embedded, time.perf_counter() - started
        )

    async def refresh_lists(self) -> None:
        """Re-rank every user whose list waits (deferred, or held by an outage whose back-off is
        over) and hand the lists to the store process, without waiting for the write (the
        timer's job: a wait, re-ranking again after each write, would re-rank once per batch on a
        backlog and undo the deferral)."""
        self._move_idle_clock()
        self._refresh()

    def _refresh(self) -> None:
        """Re-rank every user whose list waits, now; the lists are written in the background."""
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self.lists.refresh()
        self._report_pending()

    def _refresh_in(self, delay_s: float) -> None:
        """The deferred round runs in ``delay_s`` at the latest, batch or no batch."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        if self._deferred is None or at < self._deferred.when():
            if self._deferred is not None:
                self._deferred.cancel()
            self._deferred = loop.call_at(at, self._deferred_round)

    def _deferred_round(self) -> None:
        try:
            self._refresh()
        except Exception as exc:  # as a batch's would: no checkpoint of a model in doubt
            exit_on_bug("a deferred round of re-ranking", exc)

    def _move_idle_clock(self) -> None:
        """With no event learned for IDLE_CLOCK_S, move the stream's clock on by the wall time
        since the last one, and rank the shoppers who have left by then as away: in a quiet hour
        no event would tell the model that time passed, and the push sender waits for those lists."""
        idle_s, clock = self.settings.worker.idle_clock_s, self.pipeline.recommender.clock
        if not idle_s or not math.isfinite(clock):
            return
        now = time.monotonic()
        if self._learned is None:  # restored from a checkpoint, nothing learned since: from now
            self._learned = (now, clock)
        learned_at, clock_then = self._learned
        if now - learned_at < idle_s:
            return
        if not self._idle:
            self._idle = True
            log.info("no event for %.0f s: the stream's clock moves on with the wall clock", now - learned_at)
        left = self.pipeline.advance(clock_then + (now - learned_at))
        if left:
            log.info("%d shoppers left during the quiet spell: ranked again as away", len(left))
            self.lists.add(left)

    async def write_unwritten(self) -> None:
        """Re-rank and store every user whose list has not reached Redis yet, and wait for it
        (an outage keeps them pending)."""
        await self.lists.flush()
        self._report_pending()

    def _report_pending(self) -> None:
        """Tell the Faust process when lists start or stop waiting for Redis (its idle watch)."""
        pending = self.lists.waiting
        if pending != self._reported_pending and self.outbox is not None:
            self.outbox.send((PENDING, pending))
            self._reported_pending = pending

    # --- forgetting ----------------------------------------------------------------------------

    async def apply_forget_requests(self) -> None:
        """Erase users named on the forget stream from the model, id memory and pending lists, and
        delete what this worker wrote for them (a list written after `pushrec forget` deleted
        theirs, from events learned before); checkpoint; then replace each request by its result
        (counts only, no user id). Only requests for users this worker answers for (see
        :meth:`Ownership.owns_user`): the owner of each user's partition applies theirs."""
        client, requests = self.store.client, self.keys.forget_requests()
        try:
            entries = await client.xrange(requests)
        except REDIS_UNAVAILABLE as exc:  # read again on the next tick
            log.warning("forget requests could not be read (%s): %s", self.metrics.redis_error(exc), exc)
            return
        entries = [(i, f) for i, f in entries if self.ownership.owns_user(f[b"user"].decode())]
        if not entries:
            return
        results = {}
        async with self.lists.quiet():  # no list write under way, so none lands after the delete
            for entry_id, fields in entries:
                user = fields[b"user"].decode()
                result = erase_user(self.pipeline, self.seen, user)
                result["pending_list"] = self.lists.forget(user)
                try:
                    result["list"], result["refresh_entries"] = await self.store.delete_lists(user)
                except REDIS_UNAVAILABLE as exc:  # erased; the request is read again and re-applied
                    self.metrics.redis_error(exc)
                    log.error("forget: the lists of a forgotten user could not be deleted: %s", exc)
                    return
                results[entry_id.decode()] = result
        await self.ownership.save()
        try:
            async with client.pipeline(transaction=True) as pipe:
                for request_id, result in results.items():
                    pipe.set(self.keys.forget_result(request_id), orjson.dumps(result), ex=3600)
                pipe.xdel(requests, *results)
                await pipe.execute()
        except REDIS_UNAVAILABLE as exc:  # applied; the requests are read again and re-applied
            self.metrics.redis_error(exc)
            log.error("forget: %d request(s) applied but not answered: %s", len(results), exc)
            return
        log.info("applied %d forget request(s)", len(results))

    def export_lag(self, highwater: dict[str, int]) -> None:
        """Records the broker holds beyond what the model learned, over the event partitions."""
        lag = 0
        for source, end in highwater.items():
            lag += max(0, end - self.offsets.get(source, 0))
        self.metrics.consumer_lag.set(lag)


def exit_on_bug(what: str, exc: BaseException) -> NoReturn:
    """An unexpected exception on ``what``: a bug, not bad input (that is dead-lettered). Exit
    without a checkpoint: the model may hold half a batch, and the restart restores the last
    checkpoint and re-reads the rest from Kafka, so nothing is lost (and a poison record
    crash-loops visibly). The Faust process sees this process end and exits too."""
    log.critical(
        "unexpected error on %s; exiting (code %d) without a checkpoint so that a restart re-reads "
        "it from Kafka",
        what,
        EXIT_BUG,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(EXIT_BUG)
