"""Replay a recorded event log (JSON Lines, optionally gzip'd) to the topics, keyed by user."""

from __future__ import annotations

import gzip
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm

from infra.kafka import KafkaAccess
from stream.events import DEFAULT_LIMITS, BadEvent, EventLimits, decode_event
from stream.topics import TopicNames

GZIP_MAGIC = b"\x1f\x8b"

log = logging.getLogger("pushrec.replay")


class ReplayError(Exception):
    """The replay could not run (file or broker); a one-line message."""


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped line) for each non-blank line; gzip detected by its magic bytes."""
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == GZIP_MAGIC
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            for number, line in enumerate(fh, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except (OSError, EOFError) as exc:
        raise ReplayError(f"cannot read {path}: {exc}") from None


# A paced replay sleeps only once it is this far ahead, sending the events due meanwhile
# together: a sleep per event cost more CPU than the sending (at 5,000 events/s 66 µs per event,
# 47 with the tick, 27 unpaced), taken from the worker it measures when both share a machine
# (``pushrec bench``'s latency loads).
_TICK_S = 0.002


@dataclass
class Pacing:
    """As fast as possible (default), ``rate`` events per second, or event time ``speedup``-fold
    (events due within ``_TICK_S`` go together)."""

    rate: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        self._start = time.monotonic()
        self._first_ts: float | None = None
        self._count = 0

    def wait(self, ts: float) -> None:
        self._count += 1
        if self.rate:
            due = self._start + (self._count - 1) / self.rate
        elif self.speedup:
            if self._first_ts is None:
                self._first_ts = ts
            due = self._start + max(0.0, ts - self._first_ts) / self.speedup
        else:
            return
        delay = due - time.monotonic()
        if delay >= _TICK_S:
            time.sleep(delay)


@dataclass
class ReplaySummary:
    sent: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    items_sent: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "sent": dict(self.sent),
            "events_sent": sum(self.sent.values()),
            "items_sent": self.items_sent,
            "rejected": [{"line": n, "reason": r, "detail": d} for n, r, d in self.rejected],
            "seconds": round(self.seconds, 3),
        }


class Replayer:
    """A librdkafka producer (confluent-kafka) that keeps per-user order: acks=all and one request
    in flight per broker, so a retry cannot reorder a user's events. Records are keyed by user and
    partitioned as the Java client and kafka-python do (murmur2): a user's events land where
    ``stream.topics.partition_of`` says their state lives.

    librdkafka encodes and sends in its own C threads. Paced at 7,000 events/s, a replay took
    0.17-0.20 of a core where kafka-python's producer took 0.61-0.65 (docs/benchmarks.md): CPU
    that ``pushrec bench``'s load generator took from the worker it measures on the same machine.
    """

    def __init__(
        self,
        kafka: KafkaAccess,
        names: TopicNames,
        limits: EventLimits = DEFAULT_LIMITS,
        delivery_timeout_s: float = 30.0,
    ) -> None:
        """A record not delivered within ``delivery_timeout_s`` of its send fails the replay."""
        self.names = names
        self.kafka = kafka
        self.delivery_timeout_s = delivery_timeout_s
        self.failed: list[str] = []
        self.limits = limits
        try:
            self.producer = Producer(
                {
                    **kafka.librdkafka_options(),
                    "acks": "all",
                    "linger.ms": 5,
                    "batch.size": 256 * 1024,
                    "max.in.flight.requests.per.connection": 1,  # retries cannot reorder a user's events
                    "retries": 5,
                    "request.timeout.ms": 15_000,
                    "message.timeout.ms": int(delivery_timeout_s * 1000),
                    "partitioner": "murmur2_random",  # keyed records: as the Java client and kafka-python
                    "logger": log,
                }
            )
        except KafkaException as exc:
            raise ReplayError(f"cannot make a Kafka producer for {kafka}: {exc}") from None

    def replay_items(self, path: Path, summary: ReplaySummary) -> None:
        for number, line in read_lines(path):
            try:
                item = orjson.loads(line)
                item_id = item.get("item_id") if isinstance(item, dict) else None
            except orjson.JSONDecodeError:
                item_id = None
            if not isinstance(item_id, str) or not item_id:
                summary.rejected.append((number, "bad_item", f"{path.name}: not an item with item_id"))
                continue
            self._send(self.names.items, item_id.encode(), line)
            summary.items_sent += 1

    def replay(
        self,
        events: Path,
        items: Path | None = None,
        pacing: Pacing | None = None,
        progress: bool | None = None,
    ) -> ReplaySummary:
        started = time.monotonic()
        summary = ReplaySummary()
        pacing = pacing or Pacing()
        if items is not None:
            self.replay_items(items, summary)
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(desc="replay", unit=" ev", disable=not show, file=sys.stderr) as bar:
            for number, line in read_lines(events):
                try:
                    event = decode_event(line, self.limits)
                except BadEvent as bad:
                    summary.rejected.append((number, bad.reason.value, bad.detail))
                    continue
                pacing.wait(event.ts)
                topic = self.names.events(event.type)
                self._send(topic, event.user_id.encode(), line)
                summary.sent[topic] += 1
                bar.update()
        self.flush()
        summary.seconds = time.monotonic() - started
        return summary

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        waited_since = None
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:  # librdkafka's queue is full: let it drain, within a limit
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > self.delivery_timeout_s:
                    raise ReplayError(
                        f"Kafka at {self.kafka} took no records for {self.delivery_timeout_s:.0f} s "
                        f"({len(self.producer):,} waiting to be sent)"
                    ) from None
                self.producer.poll(0.1)
            except KafkaException as exc:
                raise ReplayError(f"producing to {topic} failed: {exc}") from None
        self.producer.poll(0)  # delivery reports (and librdkafka's logs) of what was sent so far
        if self.failed:
            raise ReplayError(self._failure())

    def _failure(self) -> str:
        return (
            f"{len(self.failed)} records were not delivered to Kafka at {self.kafka}, first: {self.failed[0]}"
        )

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed.append(f"{message.topic()}: {error.str()}")

    def flush(self, timeout_s: float = 60.0) -> None:
        waiting = self.producer.flush(timeout_s)
        if self.failed:
            raise ReplayError(self._failure())
        if waiting:
            raise ReplayError(
                f"{waiting:,} records not delivered to Kafka at {self.kafka} within {timeout_s:.0f} s"
            )

    def close(self) -> None:
        """Deliver what is still queued (5 s at most; the rest is dropped) and close the
        connections: librdkafka closes them when the producer is destroyed, and a broker that is
        asked to stop waits for its clients' connections."""
        if self.producer.flush(5):
            self.producer.purge()
            self.producer.flush(0)  # (the dropped records' reports)
        del self.producer
