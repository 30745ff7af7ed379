"""The dead-letter envelope: the raw record untouched, its origin and reason in headers.

As in Kafka Connect's dead-letter queues, the value stays the exact bytes that failed (invalid
UTF-8 included) and the context rides in headers, so a fixed consumer can re-drive it as is.

>>> h = dead_letter_headers(Reason.INVALID_JSON, "bad", "pushrec.events.click", 0, 7)
>>> DeadLetter.from_record(b"{", b"u1", h).source
('pushrec.events.click', 0, 7)
"""

from __future__ import annotations

from dataclasses import dataclass

from stream.events import Reason

REASON = "pushrec.dlq.reason"
DETAIL = "pushrec.dlq.detail"
TOPIC = "pushrec.dlq.topic"
PARTITION = "pushrec.dlq.partition"
OFFSET = "pushrec.dlq.offset"

_MAX_DETAIL = 300


def dead_letter_headers(
    reason: Reason, detail: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    return [
        (REASON, reason.value.encode()),
        (DETAIL, detail[:_MAX_DETAIL].encode("utf-8", "replace")),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
    ]


@dataclass(frozen=True)
class DeadLetter:
    """A dead-letter record read back."""

    raw: bytes
    key: bytes | None
    reason: str
    detail: str
    source: tuple[str, int, int]

    @classmethod
    def from_record(
        cls, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]] | tuple
    ) -> DeadLetter:
        h = {k: v.decode("utf-8", "replace") for k, v in headers}
        return cls(
            raw=value,
            key=key,
            reason=h.get(REASON, "unknown"),
            detail=h.get(DETAIL, ""),
            source=(h.get(TOPIC, ""), int(h.get(PARTITION, -1)), int(h.get(OFFSET, -1))),
        )
