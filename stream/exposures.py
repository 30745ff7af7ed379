"""The exposure log (``pushrec.pushes``): one record per push decision, sent or not, keyed by
user; and reading it back with the events it is judged against (``pushrec push-report``).

A record (JSON; ``online_models.push_report`` reads it):
``push_id, user_id, item_id (None when no item was chosen), rank, score (for below_recent
the best candidate's, under the bar), trigger, reason, list_version, policy_version, decision
(sent, holdout, or why not: capped, below_threshold, below_recent, active, failed,
dead_letter), group (treated | holdout), segment, decided_at, delivered_at`` (None unless sent,
or, for the holdout, when it would have been sent).

The sender waits for the broker's acknowledgement of a record before it records the push as done
in Redis, so a crash can repeat a record but not lose one: readers keep the last per push id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from infra.kafka import KafkaAccess
from stream.records import poll_until_quiet


class ExposureLogError(Exception):
    """The exposure log could not be written; the message names the broker."""


class ExposureLog:
    """Writes exposure records to ``topic``, each acknowledged before :meth:`write` returns."""

    def __init__(self, kafka: KafkaAccess, topic: str, timeout_s: float = 30.0) -> None:
        self.kafka, self.topic, self.timeout_s = kafka, topic, timeout_s
        try:
            self._producer = KafkaProducer(**kafka.client_options(), acks="all", linger_ms=0)
        except (KafkaError, OSError) as exc:
            raise ExposureLogError(f"cannot reach Kafka at {kafka} for the exposure log: {exc}") from None

    async def write(self, record: dict[str, Any]) -> None:
        future = self._producer.send(
            self.topic, key=str(record["user_id"]).encode(), value=orjson.dumps(record)
        )
        try:
            await asyncio.to_thread(future.get, self.timeout_s)
        except KafkaError as exc:
            raise ExposureLogError(
                f"Kafka at {self.kafka} did not take an exposure record on {self.topic}: {exc}"
            ) from None

    def close(self) -> None:
        self._producer.close(timeout=self.timeout_s)


def read_topics(kafka: KafkaAccess, topics: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(topic, value) of every record of ``topics`` from the earliest retained, until a poll
    finds nothing new."""
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        for tp, message in poll_until_quiet(consumer, list(topics), max_records=5000):
            yield tp.topic, message.value
    finally:
        consumer.close()
