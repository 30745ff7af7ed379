"""What a worker must not lose, and how it gets it back: checkpoints by partition.

A consumer group shares one set of checkpoints (:class:`infra.checkpoint.CheckpointSet`): per
event partition ``p<N>``, the state of the users whose events come from partition N (histories,
factors), the next offset of partition N of every consumed topic, its event-id memory and the
users whose list is pending; and ``items``, the item state (factors, popularity, catalogue),
written by every worker. Whoever owns a partition restores it on assignment, catches up from
Kafka (``consumers.catch_up``) and checkpoints it periodically and when it is revoked.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from infra.checkpoint import (
    CheckpointSet,
    CheckpointStore,
    DiskCheckpoints,
    DiskCheckpointSet,
    JsonPieces,
    RedisCheckpoints,
    RedisCheckpointSet,
    pack,
    unpack,
)
from infra.settings import Settings
from infra.store import Keys
from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender, TopN
from online_models.user_table import UserSnapshot
from stream.dedupe import SeenEventIds
from stream.events import Item

log = logging.getLogger("pushrec.worker")

ITEMS = "items"


def partition_part(partition: int) -> str:
    """The checkpoint name of an event partition's state."""
    return f"p{partition}"


def partition_of_source(source: str) -> int:
    """The partition number of a ``topic:partition`` source."""
    return int(source.rsplit(":", 1)[1])


def offsets_of(offsets: dict[str, int], partition: int) -> dict[str, int]:
    """The offsets of ``partition``'s sources (``topic:partition``) among ``offsets``."""
    return {source: offset for source, offset in offsets.items() if partition_of_source(source) == partition}


def _name(settings: Settings) -> str:
    return settings.checkpoint.name or settings.kafka.consumer_group


def checkpoint_set(settings: Settings, redis: object) -> CheckpointSet | None:
    """The group's checkpoints as configured (``redis`` is an asyncio client), or None when off."""
    store, name = settings.checkpoint.store, _name(settings)
    if store == "disk":
        return DiskCheckpointSet(Path(settings.state_dir) / "checkpoints" / name)
    if store == "redis":
        return RedisCheckpointSet(redis, Keys(settings.redis.key_prefix).checkpoint(name))  # type: ignore[arg-type]
    return None


def legacy_checkpoint(settings: Settings, redis: object) -> CheckpointStore | None:
    """Where a worker kept its one whole-model checkpoint before 2026-12-01."""
    store, name = settings.checkpoint.store, _name(settings)
    if store == "disk":
        return DiskCheckpoints(Path(settings.state_dir) / "checkpoints" / f"{name}.npz")
    if store == "redis":
        return RedisCheckpoints(redis, Keys(settings.redis.key_prefix).checkpoint(name))  # type: ignore[arg-type]
    return None


def pack_items(recommender: Recommender, unwritten_items: Iterable[Item] = ()) -> bytes:
    """The item blob: item state and catalogue items not stored in Redis yet."""
    return pack(*_items_content(recommender, unwritten_items))


def _items_content(
    recommender: Recommender, unwritten_items: Iterable[Item], exchange: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta, arrays = recommender.item_state()
    items = [asdict(item) for item in unwritten_items]
    content = {"kind": ITEMS, "model": meta, "unwritten_items": items, "saved_at": time.time()}
    return {**content, "exchange": exchange}, arrays


def unpack_items(blob: bytes, recommender: Recommender) -> tuple[list[Item], dict[str, Any] | None]:
    """Load an item blob into ``recommender``; return the catalogue items not stored yet and
    where the item-delta topic was read (``consumers.item_exchange``)."""
    meta, arrays = unpack(blob)
    recommender.restore_items(meta["model"], arrays)
    return [Item(**fields) for fields in meta.get("unwritten_items", [])], meta.get("exchange")


def pack_partition(
    recommender: Recommender,
    seen: SeenEventIds,
    partition: int,
    offsets: dict[str, int],
    unwritten: Iterable[str],
    ranked: Iterable[TopN] = (),
) -> bytes:
    """Partition ``partition``'s blob: its users, the offsets and event-id memory of its sources
    (``topic:partition``), its users whose list is pending (to rank, or ranked)."""
    model_meta, arrays = recommender.users.state(recommender.users.in_partition(partition))
    meta = _partition_meta(recommender, partition, offsets, unwritten, model_meta, ranked)
    meta["seen"] = seen.state_of(meta["offsets"])
    return pack(meta, arrays)


def _partition_meta(
    recommender: Recommender,
    partition: int,
    offsets: dict[str, int],
    unwritten: Iterable[str],
    model_meta: dict[str, Any],
    ranked: Iterable[TopN] = (),
) -> dict[str, Any]:
    """A partition blob's metadata but its event-id memory: the offsets of its sources
    (``topic:partition``), its users whose list is pending (``unwritten``: to rank; ``ranked``:
    ranked, as ranked), its users' state."""
    mine = recommender.users.partition_of
    return {
        "kind": "partition",
        "partition": partition,
        "offsets": offsets_of(offsets, partition),
        "unwritten": [u for u in unwritten if mine(u) == partition],
        "ranked": [asdict(top) for top in ranked if mine(top.user_id) == partition],
        "model": model_meta,
        "saved_at": time.time(),
    }


class _Slices:
    """Yields to the event loop once ``slice_s`` of work has passed since the last yield, so the
    loop never waits longer than about that (plus one step)."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s, self._since = slice_s, time.perf_counter()

    async def step_done(self) -> None:
        if time.perf_counter() - self._since >= self.slice_s:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


_STEP = 32  # users written between two looks at the clock (~1 ms)
_LAST_FEW = 64  # changed users few enough to write in the final cut (~2 ms)
_PASSES = 8  # at most this many passes over the users that changed meanwhile


async def checkpoint_live(
    recommender: Recommender,
    seen: SeenEventIds,
    partitions: Collection[int],
    offsets: dict[str, int],
    pending: Callable[[], Iterable[str]],
    unwritten_items: Callable[[], Iterable[Item]] = lambda: (),
    slice_s: float = 0.005,
    cut: Callable[[], dict[str, Any] | None] = lambda: None,
    ranked: Callable[[], Iterable[TopN]] = lambda: (),
) -> dict[str, bytes]:
    """The item blob and each of ``partitions``' blobs (:func:`pack_items`, :func:`pack_partition`)
    as of one moment, stopping learning for no more than about ``slice_s`` at a time (and for
    that moment itself: a few users, the item state, the offsets).

    Users are written a few at a time, yielding to the event loop after every ``slice_s`` of
    work, while the recommender tracks whose state changes meanwhile; those are written again,
    in passes, while more than a few. The last few, the item state, the offsets, the event-id
    memory and the pending users and items are then taken with no await between them: every
    blob holds the state of that moment, as one consistent cut (``cut()`` is called at it: what
    the item blob adds about the group's item state). The blobs are serialised in a thread."""
    slices = _Slices(slice_s)
    by_partition: dict[int, list[str]] = {partition: [] for partition in partitions}
    table = recommender.users
    changed = table.track_changes()  # before the users are listed: a user new meanwhile is in it
    try:
        users = table.ids()
        # What the model holds is long-lived: out of the collector's sight, it is not scanned
        # again and again (a full collection over a million users' objects stopped the loop for
        # seconds in all while a checkpoint allocated), nor is the list of them (in a young
        # generation, each collection scanned it). Refcounting still frees them; only cycles
        # alive now and garbage later would stay (the model's state has none).
        gc.freeze()
        while users:  # taken from the end, so the list shrinks (and is freed) a slice at a time
            for user in users[-100 * _STEP :]:
                found = by_partition.get(table.partition_of(user))
                if found is not None:
                    found.append(user)
            del users[-100 * _STEP :]
            await slices.step_done()
        gc.freeze()  # the partitions' lists
        snapshots = {partition: UserSnapshot(len(todo)) for partition, todo in by_partition.items()}
        for partition, todo in by_partition.items():
            for start in range(0, len(todo), _STEP):
                table.write(todo[start : start + _STEP], partition, snapshots[partition])
                await slices.step_done()
        for _ in range(_PASSES):  # again, those that changed meanwhile, while more than a few
            if len(changed) <= _LAST_FEW:
                break
            todo, changed = list(changed), table.track_changes()
            for start in range(0, len(todo), _STEP):
                for partition, snapshot in snapshots.items():
                    table.write(todo[start : start + _STEP], partition, snapshot)
                await slices.step_done()
        # From here to the blobs' content, no await: one moment for items, users, offsets, memory.
        last = list(changed)
        for partition, snapshot in snapshots.items():
            table.write(last, partition, snapshot)
        contents = {ITEMS: _items_content(recommender, unwritten_items(), cut())}
        waiting, waiting_ranked, offsets_now = list(pending()), list(ranked()), dict(offsets)
        memories = {}
        for partition in snapshots:
            memories[partition] = seen.freeze(offsets_of(offsets_now, partition))
    finally:
        table.untrack_changes()

    def serialise() -> dict[str, bytes]:
        """Pack the blobs (in a thread: the snapshots are this checkpoint's own from here on)."""
        blobs = {ITEMS: pack(*contents[ITEMS])}
        for partition, snapshot in snapshots.items():
            model_meta, arrays = table.snapshot_state(snapshot)
            model_meta["users"] = JsonPieces.object(model_meta["users"])
            model_meta["factor_users"] = JsonPieces.array(model_meta["factor_users"])
            meta = _partition_meta(recommender, partition, offsets_now, waiting, model_meta, waiting_ranked)
            seen = SeenEventIds.thaw_json(memories[partition])
            meta["seen"] = {source: JsonPieces.array(members) for source, members in seen.items()}
            blobs[partition_part(partition)] = pack(meta, arrays)
            snapshot.clear()  # freed here, a shard at a time, not by the loop's thread at once
        return blobs

    return await asyncio.to_thread(serialise)


def unpack_partition(
    blob: bytes, recommender: Recommender, seen: SeenEventIds, partition: int
) -> tuple[dict[str, int], list[str], list[TopN]]:
    """Load a partition blob into ``recommender`` and ``seen``; return its offsets, the users whose
    list is to be ranked and the lists ranked but not written."""
    meta, arrays = unpack(blob)
    recommender.users.restore(meta["model"], arrays, partition)
    seen.restore(meta["seen"])
    ranked = [TopN(**fields) for fields in meta.get("ranked", [])]
    return dict(meta["offsets"]), list(meta["unwritten"]), ranked


def split_legacy(blob: bytes, recommender: Recommender, partitions: int) -> dict[str, bytes]:
    """A whole-model checkpoint of before 2026-12-01 as the parts of a checkpoint set: users go to
    the partition Kafka's default partitioner gives their id (as the replay and the SDKs key them)."""
    from stream.topics import partition_of

    meta, arrays = unpack(blob)
    recommender.restore(meta["model"], arrays)
    seen = SeenEventIds(1 << 30)
    seen.restore(meta["seen"])
    for user in list(meta["model"]["users"]):
        recommender.users.place(user, partition_of(user, partitions))
    unwritten = list(meta["unwritten"])
    parts = {ITEMS: pack_items(recommender, [Item(**f) for f in meta.get("unwritten_items", [])])}
    for partition in range(partitions):
        parts[partition_part(partition)] = pack_partition(
            recommender, seen, partition, dict(meta["offsets"]), unwritten
        )
    recommender.users.drop(list(meta["model"]["users"]))
    return parts


def erase_user(pipeline: RefreshPipeline, seen: SeenEventIds, user: str) -> dict[str, Any]:
    """Erase ``user`` from the model and the event-id memory; what was removed (the caller adds
    whether a pending list was dropped: it holds them)."""
    return {"model": pipeline.forget(user), "dedupe_ids": seen.forget(user)}


def erase_from_partition(blob: bytes, user: str) -> tuple[bytes, dict[str, Any]] | None:
    """A partition blob without ``user`` (history, factors, event ids, pending list) and what was
    removed; None when the blob does not hold them."""
    meta, arrays = unpack(blob)
    model = meta["model"]
    factor_users: list[str] = model["factor_users"]
    dedupe = {source: [pair for pair in pairs if pair[1] != user] for source, pairs in meta["seen"].items()}
    dropped_ids = sum(len(pairs) - len(dedupe[source]) for source, pairs in meta["seen"].items())
    held = user in model["users"] or user in factor_users
    ranked = meta.get("ranked", [])
    pending = user in meta["unwritten"] or any(top["user_id"] == user for top in ranked)
    if not held and not dropped_ids and not pending:
        return None
    if user in factor_users:
        row = factor_users.index(user)
        arrays["user_factors"] = np.delete(arrays["user_factors"], row, axis=0)
        del factor_users[row]
    model["users"].pop(user, None)
    result = {"model": held, "dedupe_ids": dropped_ids, "pending_list": pending}
    meta["unwritten"] = [u for u in meta["unwritten"] if u != user]
    meta["ranked"] = [top for top in ranked if top["user_id"] != user]
    meta["seen"] = dedupe
    meta.pop("format", None)
    meta.pop("version", None)
    return pack(meta, arrays), result
