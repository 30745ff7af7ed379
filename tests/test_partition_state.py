"""Partition checkpoints as pure code: a partition's users travel to a worker that numbers its
items differently; a whole-model checkpoint of an older pushrec splits into partitions; forget
edits a partition blob."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from consumers.recovery import (
    ITEMS,
    erase_from_partition,
    pack_partition,
    partition_part,
    split_legacy,
    unpack_items,
    unpack_partition,
)
from infra.checkpoint import DiskCheckpointSet, RedisCheckpointSet, pack, unpack
from online_models.recommender import Recommender
from stream.dedupe import SeenEventIds
from stream.topics import partition_of
from tests.conftest import Hermetic

EVENTS = [(f"u{n % 7}", f"i{(n * 5) % 11}", "click" if n % 3 else "purchase", float(n)) for n in range(80)]


def learned(order: list[tuple[str, str, str, float]], partition: int | None = None) -> Recommender:
    rec = Recommender(n_factors=4, seed=1)
    for user, item, kind, ts in order:
        rec.learn_one(user, item, kind, ts)
        rec.users.place(user, partition_of(user, 2) if partition is None else partition)
    return rec


def history(rec: Recommender, user: str) -> tuple[list[str], list[str], list[str]]:
    """The user's session, consumed and interest items, by id."""
    state = rec.users.get(user)
    assert state is not None
    ids = rec.items.ids
    return (
        [ids[r] for r in state.session],
        sorted(ids[r] for r in state.consumed),
        sorted(ids[r] for r in state.interest_rows),
    )


def test_a_partition_moves_to_a_worker_that_numbers_items_differently() -> None:
    owner = learned(EVENTS)
    other = learned(list(reversed(EVENTS[40:])), partition=9)  # same items, rows in another order
    assert owner.items.ids != other.items.ids
    seen = SeenEventIds(10)
    seen.check_and_add("t:1", "e1", "u1")
    moved = owner.users.in_partition(1)
    assert moved and not set(moved) & set(owner.users.in_partition(0))
    # Lists ranked but not written yet travel as they were ranked (re-ranked from a later
    # state they would differ from the ones an uninterrupted worker writes).
    ranked = [owner.recommend(user, explain=True) for user in owner.users.ids()]
    blob = pack_partition(owner, seen, 1, {"t:0": 5, "t:1": 7}, ["u1", "u2"], ranked)

    other.users.drop(moved)
    received = SeenEventIds(10)
    offsets, pending, lists = unpack_partition(blob, other, received, 1)
    assert offsets == {"t:1": 7} and received.state() == {"t:1": [("e1", "u1")]}
    assert pending == [u for u in ["u1", "u2"] if u in moved]
    assert lists == [top for top in ranked if top.user_id in moved] and lists
    for user in moved:
        assert history(other, user) == history(owner, user)
        assert other.users.partition_of(user) == 1
        assert (other.mf.user_vector(user) == owner.mf.user_vector(user)).all()


def test_a_whole_model_checkpoint_splits_into_partitions() -> None:
    rec = learned(EVENTS)
    seen = SeenEventIds(10)
    for n, (user, *_rest) in enumerate(EVENTS):
        seen.check_and_add(f"t:{partition_of(user, 2)}", f"e{n}", user)
    # The format before 2026-12-01: one blob, users' rows in the worker's own numbering.
    meta, arrays = rec.item_state()
    factor_users, user_arrays = rec.mf.user_state(rec.users.ids())
    meta["mf"]["users"] = factor_users
    meta["users"] = {user: rec.users.get(user).to_json() for user in rec.users}  # type: ignore[union-attr]
    offsets = {"t:0": 40, "t:1": 41}
    legacy = pack(
        {
            "offsets": offsets,
            "seen": seen.state(),
            "unwritten": ["u3"],
            "model": meta,
            "saved_at": time.time(),
        },
        {**arrays, **user_arrays},
    )

    parts = split_legacy(legacy, Recommender(n_factors=4, seed=1), 2)
    assert set(parts) == {ITEMS, partition_part(0), partition_part(1)}
    fresh = Recommender(n_factors=4, seed=1)
    unpack_items(parts[ITEMS], fresh)
    for partition in (0, 1):
        restored_offsets, pending, _ = unpack_partition(
            parts[partition_part(partition)], fresh, SeenEventIds(10), partition
        )
        assert restored_offsets == {f"t:{partition}": offsets[f"t:{partition}"]}
        assert pending == (["u3"] if partition_of("u3", 2) == partition else [])
    assert sorted(fresh.users) == sorted(rec.users)
    for user in rec.users:
        assert history(fresh, user) == history(rec, user)
        assert fresh.recommend(user).items == rec.recommend(user).items


def test_forget_edits_the_partition_blob_that_holds_the_user() -> None:
    rec = learned(EVENTS)
    seen = SeenEventIds(10)
    user = rec.users.in_partition(0)[0]
    seen.check_and_add("t:0", "e1", user)
    blob = pack_partition(rec, seen, 0, {"t:0": 3}, [user], [rec.recommend(user)])
    assert erase_from_partition(blob, "nobody") is None
    edited, removed = erase_from_partition(blob, user)  # type: ignore[misc]
    assert removed == {"model": True, "dedupe_ids": 1, "pending_list": True}
    meta, arrays = unpack(edited)
    assert user not in meta["model"]["users"] and user not in meta["model"]["factor_users"]
    assert len(meta["model"]["factor_users"]) == arrays["user_factors"].shape[0]
    assert meta["seen"] == {"t:0": []} and meta["unwritten"] == [] and meta["ranked"] == []


def test_letting_users_go_drops_their_served_lists_too() -> None:
    from online_models.pipeline import RefreshPipeline

    pipeline = RefreshPipeline(learned(EVENTS))
    moved = pipeline.recommender.users.in_partition(1)
    pipeline.refresh(moved)
    assert all(user in pipeline._served for user in moved)
    pipeline.drop_users(moved)
    assert not any(user in pipeline._served or pipeline.recommender.users.holds(user) for user in moved)


def test_a_crash_while_a_checkpoint_set_is_written_leaves_the_old_set_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The item state and the partitions are replaced together: a crash part-way leaves every
    part as it was, so the item state is never ahead of (or behind) the partitions' offsets."""
    store = DiskCheckpointSet(tmp_path / "group")
    asyncio.run(store.save_all({"items": b"items at t1", "p0": b"p0 at t1"}))
    synced = 0
    real_fsync = os.fsync

    def crash_at_the_second_part(fd: int) -> None:
        nonlocal synced
        synced += 1
        if synced == 2:
            raise OSError("killed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crash_at_the_second_part)
    with pytest.raises(OSError, match="killed"):
        asyncio.run(store.save_all({"items": b"items at t2", "p0": b"p0 at t2"}))
    assert asyncio.run(store.part("items").load()) == b"items at t1"
    assert asyncio.run(store.part("p0").load()) == b"p0 at t1"
    monkeypatch.setattr(os, "fsync", real_fsync)
    asyncio.run(store.save_all({"items": b"items at t3", "p0": b"p0 at t3"}))
    assert [asyncio.run(store.part(name).load()) for name in ("items", "p0")] == [b"items at t3", b"p0 at t3"]
    assert asyncio.run(store.parts()) == ["items", "p0"]


def test_a_redis_checkpoint_set_is_replaced_in_one_transaction(hermetic: Hermetic) -> None:
    async def scenario() -> list[bytes | None]:
        client = aioredis.Redis.from_url(hermetic.servers.redis_url)
        try:
            store = RedisCheckpointSet(client, f"{hermetic.prefix}:checkpoint:group")
            await store.save_all({"items": b"items", "p0": b"p0", "p1": b"p1"})
            assert await store.parts() == ["items", "p0", "p1"]
            return [await store.part(name).load() for name in ("items", "p0", "p1")]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"items", b"p0", b"p1"]
