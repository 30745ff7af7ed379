"""The catch-up when a worker takes a partition: re-learn, straight from Kafka, the records between
the partition's checkpoint offsets and the group's committed offsets."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from infra.kafka import KafkaAccess
from stream.records import Record


class CatchUpStalled(RuntimeError):
    """The broker delivered nothing for a while below offsets it says it holds."""


class CatchUp:
    """The records the group committed but the model does not hold, streamed in batches.

    Per partition, from the model's next offset (``offsets``; the first retained one when it does
    not know it) up to the group's committed offset. Both ends are clamped to what the broker
    still holds, and what falls outside is counted rather than waited for:

    - ``retention_lost``: records retention deleted before the model learned them (a checkpoint
      older than the topic's retention). Reading starts at the first retained offset.
    - ``truncated``: committed offsets past the log's end (the broker lost records the group had
      read: an unclean leader election, a broker restored from an older copy). Reading stops at
      the end.

    Records retention deletes while the catch-up reads are skipped by the consumer's reset to the
    first retained offset, and not counted (a gap in offsets can also be a transaction marker).

    Batches hold at most ``batch_max`` records, so a gap of any length is read in bounded memory.
    Nothing here crash-loops on the data: a stall only comes from a broker that stopped answering,
    and is raised after ``stall_after_s`` with the partitions it held back.
    """

    def __init__(
        self,
        kafka: KafkaAccess,
        group: str,
        topics: Iterable[str],
        offsets: dict[str, int],
        batch_max: int = 500,
        stall_after_s: float = 15.0,
        partitions: Collection[int] | None = None,
    ) -> None:
        """``partitions``: only these partition numbers of ``topics`` (default all)."""
        self.kafka, self.group, self.topics = kafka, group, set(topics)
        self.partitions = None if partitions is None else set(partitions)
        self.offsets, self.batch_max, self.stall_after_s = offsets, batch_max, stall_after_s
        self.retention_lost: dict[str, int] = {}
        self.truncated: dict[str, int] = {}
        self.records = 0

    def _committed(self) -> dict[Any, int]:
        from kafka import KafkaAdminClient, TopicPartition

        admin = KafkaAdminClient(**self.kafka.client_options(), client_id="pushrec-catch-up")
        try:
            committed = admin.list_group_offsets({self.group: None}).get(self.group, {})
        finally:
            admin.close()
        return {
            TopicPartition(tp.topic, tp.partition): meta.offset
            for tp, meta in committed.items()
            if tp.topic in self.topics
            and meta.offset > 0
            and (self.partitions is None or tp.partition in self.partitions)
        }

    def _plan(self, consumer: Any, committed: dict[Any, int]) -> dict[Any, tuple[int, int]]:
        """(first offset to read, offset to stop before) per partition with anything to read."""
        first = consumer.beginning_offsets(list(committed))
        todo = {}
        for tp, end in committed.items():
            source = f"{tp.topic}:{tp.partition}"
            start = self.offsets.get(source, first[tp])
            if start < first[tp]:
                self.retention_lost[source] = min(first[tp], end) - start
                start = first[tp]
            if end > start:
                todo[tp] = (start, end)
        return todo

    def _at_log_end(self, consumer: Any, todo: dict[Any, tuple[int, int]]) -> list[Any]:
        """Partitions read to the log's end (the high watermark of the last fetch) short of their
        committed offset, counted as truncated. The fetch's watermark, not ListOffsets: Tansu
        answers the latter with the last batch's first offset plus one."""
        done = []
        for tp, (_, end) in todo.items():
            position, highwater = consumer.position(tp), consumer.highwater(tp)
            if highwater is not None and position >= highwater:
                self.truncated[f"{tp.topic}:{tp.partition}"] = end - position
                done.append(tp)
        return done

    def batches(self) -> Iterator[list[Record]]:
        from kafka import KafkaConsumer

        committed = self._committed()
        if not committed:
            return
        consumer = KafkaConsumer(
            **self.kafka.client_options(),
            enable_auto_commit=False,
            # Retention may delete the next records while we read: go on from the first kept one.
            auto_offset_reset="earliest",
            max_poll_records=self.batch_max,
        )
        try:
            todo = self._plan(consumer, committed)
            consumer.assign(list(todo))
            for tp, (start, _) in todo.items():
                consumer.seek(tp, start)
            quiet_since = time.monotonic()
            while todo:
                polled = consumer.poll(timeout_ms=1000, max_records=self.batch_max)
                if not polled:
                    for tp in self._at_log_end(consumer, todo):
                        del todo[tp]
                        consumer.pause(tp)
                    if todo and time.monotonic() - quiet_since > self.stall_after_s:
                        held = ", ".join(f"{tp.topic}:{tp.partition}" for tp in todo)
                        raise CatchUpStalled(
                            f"the Kafka broker at {self.kafka.bootstrap} delivered nothing for "
                            f"{self.stall_after_s:.0f}s below the committed offsets of {held}"
                        )
                    continue
                quiet_since = time.monotonic()
                batch = []
                for tp, messages in polled.items():
                    end = todo[tp][1]
                    for m in messages:
                        if m.offset < end:
                            ts = m.timestamp / 1000 if m.timestamp else None
                            batch.append(Record(m.topic, m.partition, m.offset, m.key, m.value, ts))
                    if messages and messages[-1].offset + 1 >= end:
                        del todo[tp]
                        consumer.pause(tp)
                self.records += len(batch)
                if batch:
                    yield batch
        finally:
            consumer.close()
