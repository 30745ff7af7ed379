"""Replay a recorded event log (JSON Lines, optionally gzip'd) to the topics, keyed by user."""

from __future__ import annotations

import gzip
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from infra.kafka import KafkaAccess
from stream.events import DEFAULT_LIMITS, BadEvent, EventLimits, decode_event
from stream.topics import TopicNames

GZIP_MAGIC = b"\x1f\x8b"


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
    """A kafka-python producer that keeps per-user order (one in-flight request, acks=all)."""

    def __init__(self, kafka: KafkaAccess, names: TopicNames, limits: EventLimits = DEFAULT_LIMITS) -> None:
        self.names = names
        self.failed: list[str] = []
        self.limits = limits
        try:
            self.producer = KafkaProducer(
                **kafka.client_options(),
                acks="all",
                linger_ms=5,
                batch_size=256 * 1024,
                max_in_flight_requests_per_connection=1,  # retries cannot reorder a user's events
                retries=5,
                max_block_ms=10_000,
                request_timeout_ms=15_000,
            )
        except (KafkaError, OSError) as exc:
            raise ReplayError(f"cannot reach Kafka at {kafka}: {exc}") from None

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
        try:
            future = self.producer.send(topic, key=key, value=value)
        except KafkaError as exc:
            raise ReplayError(f"producing to {topic} failed: {exc}") from None
        future.add_errback(lambda exc: self.failed.append(f"{topic}: {exc}"))

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise ReplayError(f"flushing to Kafka failed: {exc}") from None
        if self.failed:
            raise ReplayError(f"{len(self.failed)} records were not delivered, first: {self.failed[0]}")

    def close(self) -> None:
        self.producer.close(timeout=5)
