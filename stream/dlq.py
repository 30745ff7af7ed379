"""Reading the dead-letter topic back: list dead letters by reason, re-drive them after a fix.

Re-driving produces each letter's raw bytes, with its original key, to the topic it came from,
so the worker decodes it again: a fixed bug lets it through; a record that is still bad returns
to the dead letters. Re-drive remembers how far it got (the committed offsets of its own consumer
group, ``<worker group>-dlq-redrive``), so running it twice does not send the same letters twice;
``from_beginning`` starts over (valid events are deduplicated by event id in the worker anyway).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata

from infra.kafka import KafkaAccess
from stream.deadletter import DeadLetter
from stream.records import poll_until_quiet

_PREVIEW = 120


@dataclass
class DeadLetterReport:
    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    letters: list[dict[str, Any]] = field(default_factory=list)
    # Re-drive only: sends the broker did not confirm (re-sent by the next run), and letters that
    # can never be sent (an illegal source topic name, a record over the producer's size limit),
    # passed over and left in the dead-letter topic.
    failed: list[dict[str, Any]] = field(default_factory=list)
    unsendable: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason),
            "letters": self.letters,
            "failed": self.failed,
            "unsendable": self.unsendable,
        }


def _read(consumer: KafkaConsumer, topic: str) -> Iterator[tuple[TopicPartition, int, DeadLetter]]:
    """Every letter from the consumer's current positions until a poll finds nothing new."""
    for tp, m in poll_until_quiet(consumer, [topic]):
        yield tp, m.offset, DeadLetter.from_record(m.value, m.key, m.headers)


def list_dead_letters(kafka: KafkaAccess, topic: str, limit: int) -> DeadLetterReport:
    """Counts by reason of every letter, and the first ``limit`` letters in detail."""
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False, auto_offset_reset="earliest")
    report = DeadLetterReport()
    try:
        for tp, offset, letter in _read(consumer, topic):
            report.total += 1
            report.by_reason[letter.reason] += 1
            if len(report.letters) < limit:
                report.letters.append(_describe(tp, offset, letter))
    finally:
        consumer.close()
    return report


def redrive(
    kafka: KafkaAccess,
    topic: str,
    group: str,
    reasons: Collection[str] = (),
    from_beginning: bool = False,
    dry_run: bool = False,
) -> DeadLetterReport:
    """Send letters (of the given reasons, or all) back to their source topics; report what was sent.

    The group's offsets advance only past letters whose send the broker confirmed (or that can
    never be sent): on a partition where a send failed, the next run starts at that letter.
    """
    consumer = KafkaConsumer(
        **kafka.client_options(), group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    producer = None if dry_run else KafkaProducer(**kafka.client_options(), acks="all")
    report = DeadLetterReport()
    last: dict[TopicPartition, int] = {}
    sends: list[tuple[TopicPartition, int, Any, dict[str, Any]]] = []
    stop_at: dict[TopicPartition, int] = {}  # the first letter not confirmed, per partition
    try:
        if from_beginning:
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
        for tp, offset, letter in _read(consumer, topic):
            last[tp] = offset
            if reasons and letter.reason not in reasons:
                continue
            source_topic = letter.source[0]
            if not source_topic:
                continue
            described = _describe(tp, offset, letter)
            report.total += 1
            report.by_reason[letter.reason] += 1
            report.letters.append(described)
            if producer is None:
                continue
            try:
                future = producer.send(source_topic, value=letter.raw, key=letter.key)
                sends.append((tp, offset, future, described))
            except (ValueError, MessageSizeTooLargeError) as exc:  # never sendable: pass over it
                report.unsendable.append({**described, "error": str(exc)})
            except KafkaError as exc:  # e.g. no metadata in time: try again next run
                stop_at.setdefault(tp, offset)
                report.failed.append({**described, "error": str(exc)})
        if producer is not None:
            producer.flush()
            for tp, offset, future, described in sends:
                if future.failed():
                    stop_at[tp] = min(offset, stop_at.get(tp, offset))
                    report.failed.append({**described, "error": str(future.exception)})
            commit = {tp: stop_at.get(tp, offset + 1) for tp, offset in last.items()}
            if commit:
                consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in commit.items()})
    finally:
        if producer is not None:
            producer.close()
        consumer.close()
    return report


def _describe(tp: TopicPartition, offset: int, letter: DeadLetter) -> dict[str, Any]:
    return {
        "reason": letter.reason,
        "detail": letter.detail,
        "source": {"topic": letter.source[0], "partition": letter.source[1], "offset": letter.source[2]},
        "dead_letter": {"partition": tp.partition, "offset": offset},
        "key": letter.key.decode("utf-8", "replace") if letter.key is not None else None,
        "raw": letter.raw[:_PREVIEW].decode("utf-8", "replace"),
        "raw_bytes": len(letter.raw),
    }
