"""The worker's dead-letter producer: a bad record's raw bytes to the dead-letter topic, with its
origin and reason, acknowledged before the worker's offset moves past it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from infra.kafka import KafkaAccess
from infra.metrics import Metrics
from stream.deadletter import dead_letter_headers
from stream.events import BadEvent
from stream.records import Record

log = logging.getLogger("pushrec.worker")


class DeadLetters:
    """kafka-python producer, made on the first dead letter."""

    def __init__(self, kafka: KafkaAccess, topic: str, metrics: Metrics) -> None:
        self.kafka = kafka
        self.topic = topic
        self.metrics = metrics
        self._producer: Any = None

    async def send(self, record: Record, kind: str | None, bad: BadEvent) -> None:
        """Dead-letter ``record`` (an event of type ``kind``, or a catalogue record for None)."""
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**self.kafka.client_options(), acks="all")
        sent = self._producer.send(
            self.topic,
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

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
