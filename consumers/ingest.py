"""The Faust side of the worker: consume the event and catalogue topics and hand every record, in
order, to the model process (``consumers/model_process.py``), which decodes, learns, ranks and writes.

Two processes because one could not keep up: Faust's own per-record work and the model's each
take most of a core (a trivial decoding agent ran at ~8-10k events/s; the whole worker in one
process at 0.35-0.48 of that). Split, they run on both cores.

The model process is the source of truth for what was learned: it keeps its own offsets and
checkpoint, so Faust may commit records the model has not learned yet (a crash of either
process ends both, and the restart re-reads those records from Kafka before Faust starts).
Both processes end together: the model process dies with this one (Linux parent-death signal),
and this one exits with the model's exit code when the model process ends.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from consumers.model_process import model_process
from consumers.pipes import widen
from consumers.protocol import (
    ASSIGN,
    DONE,
    EXIT_BUG,
    HIGHWATER,
    LOOP_LAG,
    PENDING,
    READY,
    RECORDS,
    REVOKE,
    STOP,
)
from infra.collector import freeze_what_lives
from infra.kafka import KafkaAccess
from infra.loop_watch import LoopWatch
from infra.settings import Settings
from stream.app import make_app, raw_topic
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger("pushrec.worker")


def _give_way(nice: int) -> None:
    """Lower this process's CPU priority by ``nice``, every thread of it (on Linux a nice value is
    per thread; threads started later inherit it); the model process, spawned before, keeps its
    own. Under a latency load on a 2-core machine the model's thread waited for a core 26-31 %
    of the time beside Faust, the broker and the load generator, 19-20 % with Faust at nice 10
    (docs/benchmarks.md)."""
    if not nice or not hasattr(os, "setpriority"):
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the nice value is the process's
        threads = [0]
    try:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # (raising one's own nice value is always allowed on Linux)
        log.warning("could not lower the Faust process's priority by %d: %s", nice, exc)


class Ingest:
    """The Faust app and agent of one worker, and the model process it feeds."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaAccess,
        redis_url: str,
        until_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.redis_url = redis_url
        self.names = TopicNames(settings.kafka.topic_prefix)
        self.until_idle_s = until_idle_s
        self.app = make_app(settings, kafka)
        self._consumed = {*self.names.all_events, self.names.items}
        events = raw_topic(self.app, *self.names.all_events, self.names.items)
        self.app.agent(events, name="pushrec.refresh")(self._agent)
        self.app.timer(0.25)(self._watch_model)
        self.app.timer(0.5)(self._watch_idle)
        self.app.timer(2.0)(self._report_to_model)
        # The lags are observed in the model process, which serves /metrics (_report_to_model).
        self._loop_lags: deque[float] = deque(maxlen=1000)  # ~20 s of them, if the pipe is full
        self._loop_watch = LoopWatch("faust", self._loop_lags.append, settings.worker.loop_block_s)
        self.app.task(self._loop_watch.run)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._on_shutdown)
        # One sending thread keeps messages in order; a full pipe blocks it, not the event loop.
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="pushrec-to-model")
        self._process: Any = None
        self._inbox: Any = None  # what the model process reads
        self._outbox: Any = None  # what it answers
        self._model_pending = False
        self._ready = False
        self._done = 0
        self._last_activity = time.monotonic()

    def run(self, metrics_port: int | None = None) -> None:
        """Create missing topics, start the model process (it restores and catches up, and serves
        /metrics), then run Faust until stopped (never returns)."""
        kafka = self.settings.kafka
        ensure_topics(self.kafka, self.names.all, kafka.partitions, kafka.replication_factor)
        context = multiprocessing.get_context("spawn")
        model_inbox, self._inbox = context.Pipe(duplex=False)
        widen(self._inbox)
        self._outbox, model_outbox = context.Pipe(duplex=False)
        self._process = context.Process(
            target=model_process,
            args=(self.settings, self.kafka, self.redis_url, metrics_port, model_inbox, model_outbox),
            name="pushrec-model",
        )
        self._process.start()
        model_inbox.close()
        model_outbox.close()
        _give_way(self.settings.worker.faust_nice)
        freeze_what_lives("faust")
        # PENDING may come first: catch-up writes lists, and Redis may refuse them.
        while not self._ready:
            if self._outbox.poll(0.2):
                self._read_answers()
            self._exit_if_model_ended()
        log.info(
            "worker starting: kafka=%s group=%s topics=%s metrics_port=%s model pid=%d",
            self.kafka,
            kafka.consumer_group,
            ",".join(self.names.all_events),
            metrics_port,
            self._process.pid,
        )
        try:
            faust.Worker(self.app, loglevel=self.settings.log_level, quiet=True).execute_from_commandline()
        except SystemExit as stop:
            # Everything is stopped and flushed by now, but mode's consumer thread can outlive the
            # app (its loop closed under it) and hold the interpreter's exit forever: leave now.
            logging.shutdown()
            os._exit(stop.code if isinstance(stop.code, int) else int(stop.code is not None))

    async def _agent(self, stream: faust.StreamT) -> None:
        worker = self.settings.worker
        async for batch in stream.take_events(worker.batch_max, within=worker.batch_within_s):
            records = []
            for event in batch:
                m = event.message
                records.append((m.topic, m.partition, m.offset, m.key, event.value, m.timestamp))
            self._last_activity = time.monotonic()
            try:
                await self._send(RECORDS, (time.time(), records))  # read at: latency stages
            except Exception:
                # Faust would restart the agent and this batch would never reach the model while
                # the offsets move on. Exit instead: the restart re-reads it from Kafka.
                log.critical(
                    "could not hand %d records to the model process; exiting", len(records), exc_info=True
                )
                self._process.kill()
                logging.shutdown()
                os._exit(EXIT_BUG)

    async def _send(self, kind: str, payload: object) -> None:
        blob = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            await asyncio.get_running_loop().run_in_executor(self._sender, self._inbox.send_bytes, blob)
        except OSError:  # a broken pipe: the model process is ending; exit with its code
            self._exit_if_model_ended(wait_s=5.0)
            raise

    async def _request(self, kind: str, payload: object = None) -> None:
        """Send ``kind`` and wait until the model process answers DONE (or ends)."""
        done = self._done
        await self._send(kind, payload)
        while self._done == done:
            self._last_activity = time.monotonic()  # a long catch-up is not idleness
            self._read_answers()
            self._exit_if_model_ended()
            await asyncio.sleep(0.02)

    def _read_answers(self) -> None:
        while self._outbox.poll(0):
            kind, payload = self._outbox.recv()
            if kind == PENDING:
                self._model_pending = payload
                self._last_activity = time.monotonic()
            elif kind == DONE:
                self._done += 1
            elif kind == READY:
                self._ready = True

    def _exit_if_model_ended(self, wait_s: float = 0.0) -> None:
        self._process.join(wait_s)
        code = self._process.exitcode
        if code is None:
            return
        log.critical("the model process ended (exit code %s): stopping the worker", code)
        logging.shutdown()
        os._exit(code if code > 0 else EXIT_BUG)

    async def _watch_model(self) -> None:
        self._read_answers()
        self._exit_if_model_ended()

    async def _report_to_model(self) -> None:
        """The partitions' high watermarks (the model's consumer lag) and this loop's lags."""
        consumer = self.app.consumer
        ends = {}
        for tp in consumer.assignment():
            if tp.topic in self.names.all_events:
                end = consumer.highwater(tp)
                if end is not None and end >= 0:
                    ends[f"{tp.topic}:{tp.partition}"] = end
        await self._send(HIGHWATER, ends)
        lags = list(self._loop_lags)
        self._loop_lags.clear()
        if lags:
            await self._send(LOOP_LAG, lags)

    def _partitions(self, tps: set) -> list[int]:
        """The partition numbers among ``tps`` of the topics pushrec consumes."""
        return sorted({tp.partition for tp in tps if tp.topic in self._consumed})

    async def _on_assigned(self, sender: object, assigned: set, **_: object) -> None:
        """Partition N of every consumed topic comes to one worker (Faust's assignor gives
        topics with one partition count the same numbers): the model process takes them
        (restore, catch up) before their records are learned."""
        by_topic: dict[str, set[int]] = {}
        for tp in assigned:
            if tp.topic in self._consumed:
                by_topic.setdefault(tp.topic, set()).add(tp.partition)
        if len({frozenset(numbers) for numbers in by_topic.values()}) > 1:
            log.warning("the group assigned different partition numbers per topic: %s", by_topic)
        counts = [self.app.consumer.topic_partitions(topic) for topic in self.names.all_events]
        count = max((c for c in counts if c), default=self.settings.kafka.partitions)
        await self._request(ASSIGN, (self._partitions(assigned), count))
        freeze_what_lives("faust", generation=1)  # what Faust built to consume them

    async def _on_revoked(self, sender: object, revoked: set, **_: object) -> None:
        partitions = self._partitions(revoked)
        if partitions:
            await self._request(REVOKE, partitions)

    async def _on_shutdown(self, sender: object, **_: object) -> None:
        await self._request(STOP)
        self._process.join(30)

    async def _watch_idle(self) -> None:
        if self.until_idle_s is None or not self.app.consumer.assignment() or self._model_pending:
            # Idle time counts once we own partitions and every list has reached Redis.
            self._last_activity = time.monotonic()
            return
        idle = time.monotonic() - self._last_activity
        if idle >= self.until_idle_s:
            log.info("idle for %.1fs: stopping (--until-idle)", idle)
            self.until_idle_s = None
            os.kill(os.getpid(), signal.SIGTERM)  # the same clean path as an operator's SIGTERM
