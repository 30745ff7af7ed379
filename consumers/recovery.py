"""What a worker must not lose, and how it gets it back: the checkpoint (model, offsets, event-id
memory and users whose list is pending, saved together) and the catch-up that re-learns, straight
from Kafka, the records between a checkpoint's offsets and the group's committed offsets."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infra.checkpoint import CheckpointStore, DiskCheckpoints, RedisCheckpoints, pack, unpack
from infra.kafka import KafkaAccess
from infra.settings import Settings
from infra.store import Keys
from online_models.pipeline import RefreshPipeline
from stream.dedupe import SeenEventIds
from stream.records import Record

log = logging.getLogger("pushrec.worker")


def checkpoint_store(settings: Settings, redis: object) -> CheckpointStore | None:
    """The configured checkpoint store (``redis`` is an asyncio client), or None when off."""
    conf = settings.checkpoint
    name = conf.name or settings.kafka.consumer_group
    if conf.store == "disk":
        return DiskCheckpoints(Path(settings.state_dir) / "checkpoints" / f"{name}.npz")
    if conf.store == "redis":
        return RedisCheckpoints(redis, Keys(settings.redis.key_prefix).checkpoint(name))  # type: ignore[arg-type]
    return None


def pack_state(
    pipeline: RefreshPipeline, seen: SeenEventIds, offsets: dict[str, int], unwritten: Iterable[str]
) -> bytes:
    """The checkpoint blob: model, offsets, event-id memory and users whose list is pending."""
    model_meta, arrays = pipeline.recommender.state()
    meta = {
        "offsets": offsets,
        "seen": seen.state(),
        "unwritten": list(unwritten),
        "model": model_meta,
        "saved_at": time.time(),
    }
    return pack(meta, arrays)


def unpack_state(
    blob: bytes, pipeline: RefreshPipeline, seen: SeenEventIds
) -> tuple[dict[str, int], list[str]]:
    """Load a checkpoint blob into ``pipeline`` and ``seen``; return its offsets and pending users."""
    meta, arrays = unpack(blob)
    pipeline.recommender.restore(meta["model"], arrays)
    seen.restore(meta["seen"])
    return dict(meta["offsets"]), list(meta["unwritten"])


def erase_user(pipeline: RefreshPipeline, seen: SeenEventIds, user: str) -> dict[str, Any]:
    """Erase ``user`` from the model and the event-id memory; what was removed (the caller adds
    whether a pending list was dropped: it holds them)."""
    return {"model": pipeline.forget(user), "dedupe_ids": seen.forget(user)}


def read_gap(kafka: KafkaAccess, group: str, topics: Iterable[str], offsets: dict[str, int]) -> list[Record]:
    """Records the group committed but the model does not hold, in offset order per partition:
    from the model's offset (``offsets``; the partition's first retained one if it does not know
    it) up to the committed offset."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    wanted = set(topics)
    admin = KafkaAdminClient(**kafka.client_options(), client_id="pushrec-catch-up")
    try:
        committed = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    ends = {
        TopicPartition(tp.topic, tp.partition): meta.offset
        for tp, meta in committed.items()
        if tp.topic in wanted and meta.offset > 0
    }
    if not ends:
        return []
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False)
    records: list[Record] = []
    try:
        first = consumer.beginning_offsets(list(ends))
        starts = {tp: offsets.get(f"{tp.topic}:{tp.partition}", first[tp]) for tp in ends}
        remaining = {tp for tp in ends if ends[tp] > starts[tp]}
        consumer.assign(list(remaining))
        for tp in remaining:
            consumer.seek(tp, starts[tp])
        while remaining:
            polled = consumer.poll(timeout_ms=5000)
            if not polled:
                raise RuntimeError(f"catch-up stalled before the committed offsets of {remaining}")
            for tp, messages in polled.items():
                for m in messages:
                    if m.offset < ends[tp]:
                        ts = m.timestamp / 1000 if m.timestamp else None
                        records.append(Record(m.topic, m.partition, m.offset, m.key, m.value, ts))
                if messages and messages[-1].offset >= ends[tp] - 1:
                    remaining.discard(tp)
                    consumer.pause(tp)
    finally:
        consumer.close()
    return records
