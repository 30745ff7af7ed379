"""One consumed Kafka record, in the form the worker handles whoever fetched it."""

from __future__ import annotations

from dataclasses import dataclass


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
