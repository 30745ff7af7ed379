"""Consumed Kafka records: the form the worker handles whoever fetched them, and reading topics
to their end (the dead-letter tools, the push report)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

_FIRST_POLL_MS = 5000  # the first poll also fetches metadata and positions
_QUIET_MS = 1500


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


def poll_until_quiet(
    consumer: KafkaConsumer, topics: Iterable[str], max_records: int = 500
) -> Iterator[tuple[TopicPartition, Any]]:
    """(partition, message) of every record from the consumer's current positions until a poll
    finds nothing new; a consumer with no assignment is given every partition of ``topics``.

    (Not up to ListOffsets' end offsets: the embedded Tansu broker reports batches there, not
    records.)"""
    if not consumer.assignment():
        consumer.assign(
            [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        )
    if not consumer.assignment():  # none of the topics exists: nothing to read
        return
    wait_ms = _FIRST_POLL_MS
    while polled := consumer.poll(timeout_ms=wait_ms, max_records=max_records):
        wait_ms = _QUIET_MS
        for tp, messages in polled.items():
            for message in messages:
                yield tp, message
