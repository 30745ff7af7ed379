"""Partition checkpoints as pure code: a partition's users travel to a worker that numbers its
items differently; a whole-model checkpoint of an older pushrec splits into partitions; forget
edits a partition blob."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from consumers.recovery import (
    ITEMS,
    checkpoint_live,
    erase_from_partition,
    pack_partition,
    partition_part,
    split_legacy,
    unpack_items,
    unpack_partition,
)
from infra.checkpoint import DiskCheckpointSet, JsonPieces, RedisCheckpointSet, pack, unpack
from online_models import user_table
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


def test_a_checkpoint_taken_while_learning_goes_on_holds_every_user_as_of_its_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(user_table, "_SHARD_USERS", 16)  # a snapshot of many dicts
    rec = Recommender(n_factors=4, seed=1)
    users = [f"u{n}" for n in range(300)]
    for n, user in enumerate(users):
        rec.learn_one(user, f"i{n % 13}", "click", float(n))
        rec.users.place(user, partition_of(user, 2))
    seen = SeenEventIds(4)
    for n in range(9):
        seen.check_and_add(f"t:{n % 2}", f"e{n}", users[n])
    at_cut: dict[str, Any] = {}

    def cut() -> None:  # the moment the checkpoint stands for: every user as they are now
        for user in rec.users.ids():
            at_cut[user] = (history(rec, user), rec.mf.user_vector(user, copy=True))

    async def checkpoint() -> dict[str, bytes]:
        learning = True

        async def learn() -> None:  # a few events between every two slices of the checkpoint
            n = 0
            while learning:
                for _ in range(5):
                    user = users[n * 7 % len(users)] if n % 10 else f"new{n}"
                    rec.learn_one(user, f"i{n % 17}", "click", 1000.0 + n)
                    rec.users.place(user, partition_of(user, 2))
                    n += 1
                if n % 50 == 0:
                    rec.users.drop([users[n % len(users)]])  # forgotten meanwhile
                await asyncio.sleep(0)

        task = asyncio.create_task(learn())
        offsets = {"t:0": 9, "t:1": 9}
        blobs = await checkpoint_live(rec, seen, [0, 1], offsets, lambda: (), slice_s=0.0, cut=cut)
        learning = False
        await task
        return blobs

    blobs = asyncio.run(checkpoint())
    fresh = Recommender(n_factors=4, seed=1)
    unpack_items(blobs[ITEMS], fresh)
    for partition in (0, 1):
        received = SeenEventIds(4)
        assert unpack_partition(blobs[partition_part(partition)], fresh, received, partition)[0] == {
            f"t:{partition}": 9
        }
        assert received.state() == seen.state_of([f"t:{partition}"])
    assert len(at_cut) > len(users) and sorted(fresh.users) == sorted(at_cut)
    for user, (then, vector) in at_cut.items():
        assert history(fresh, user) == then
        assert (fresh.mf.user_vector(user, copy=True) == vector).all()


def test_a_blob_holds_its_arrays_and_json_pieces_as_given() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "factors": rng.random((300_000, 16)),  # more than one slice written
        "floats32": rng.random((7, 3)).astype(np.float32),
        "strided": rng.random((8, 6))[:, ::2],
        "fortran": np.asfortranarray(rng.random((5, 3))),
        "scalar": np.float64(3.0),
        "empty": np.zeros((0, 4)),
        "ints": np.arange(10, dtype=np.int64),
        "stacked": [np.ones(2) * n for n in range(5000)],
    }
    pieces = JsonPieces.object([b'"u1":[1,2]', b'"u2":{"a":null}'])
    meta = {"users": pieces, "big": {f"k{n}": n for n in range(5000)}, "ids": list(range(5000)), 7: "x"}
    got, read = unpack(pack(meta, arrays))  # type: ignore[arg-type]
    assert got["users"] == {"u1": [1, 2], "u2": {"a": None}} and got["7"] == "x"
    assert got["big"] == meta["big"] and got["ids"] == meta["ids"]
    for name, value in arrays.items():
        expected = np.asarray(value)
        assert read[name].dtype == expected.dtype and np.array_equal(read[name], expected), name
        assert read[name].shape == expected.shape, name


def test_the_event_id_memory_freezes_at_once_and_stays_as_frozen() -> None:
    seen = SeenEventIds(capacity=32)
    owner = ["u2", "u1"]
    for n in range(10):  # more than capacity / 16 ids: the live segment is sealed, not copied
        seen.check_and_add("t:0", f"e{n}", owner[n % 2])
    seen.check_and_add("t:1", "x0", "u1")  # under capacity / 16: copied
    frozen = seen.freeze(["t:0", "t:1"])
    seen.check_and_add("t:0", "e10", "u1")
    seen.check_and_add("t:1", "x1", "u1")
    assert seen.forget("u1") == 8
    assert SeenEventIds.thaw(frozen) == {
        "t:0": [(f"e{n}", owner[n % 2]) for n in range(10)],
        "t:1": [("x0", "u1")],
    }
    assert seen.check_and_add("t:0", "e0", "u2") and not seen.check_and_add("t:0", "e1", "u1")

    many = SeenEventIds(capacity=32)
    for n in range(100):
        assert not many.check_and_add("p", f"e{n}", "u")
        if n % 3 == 0:
            many.freeze(["p"])
    assert all(many.check_and_add("p", f"e{n}", "u") for n in range(68, 100))  # the newest 32
    assert not many.check_and_add("p", "e0", "u")
    assert many.state()["p"][-33:] == [(f"e{n}", "u") for n in range(68, 100)] + [("e0", "u")]
    segments = []  # how many sealed segments a duplicate is looked up in: bounded
    for n in range(100, 200):  # frozen after every id: the live segment is copied, not sealed
        many.check_and_add("p", f"e{n}", "u")
        many.freeze(["p"])
        segments.append(len(many._seen["p"].sealed))
    assert max(segments) <= 16


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


SAVE_T2 = """
import asyncio, sys
from pathlib import Path
from infra.checkpoint import DiskCheckpointSet
blobs = {name: f"{name} at t2".encode() for name in ("items", "p0", "p1")}
asyncio.run(DiskCheckpointSet(Path(sys.argv[1])).save_all(blobs))
"""


def test_a_writer_killed_between_two_renames_leaves_the_new_set_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 after the item state is renamed into place and before the partitions are (the
    window where a restart restored an item state ahead of the offsets, and learned some events
    twice): whoever reads the set next finishes it."""
    directory = tmp_path / "group"
    store = DiskCheckpointSet(directory)
    asyncio.run(store.save_all({name: f"{name} at t1".encode() for name in ("items", "p0", "p1")}))
    child = subprocess.run(
        [sys.executable, "-c", SAVE_T2, str(directory)],
        env={**os.environ, "PUSHREC_FAULTS": "checkpoint.renamed=1"},
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL
    left = {name: (directory / f"{name}.npz").read_bytes() for name in ("items", "p0", "p1")}
    assert left == {"items": b"items at t2", "p0": b"p0 at t1", "p1": b"p1 at t1"}  # torn, as killed
    with caplog.at_level("WARNING", logger="pushrec.worker"):
        assert asyncio.run(store.parts()) == ["items", "p0", "p1"]
    assert "finished the replacement of items.npz, p0.npz, p1.npz" in caplog.text
    loaded = [asyncio.run(DiskCheckpointSet(directory).part(name).load()) for name in ("p0", "items", "p1")]
    assert loaded == [b"p0 at t2", b"items at t2", b"p1 at t2"]
    assert sorted(os.listdir(directory)) == ["items.npz", "p0.npz", "p1.npz"]  # nothing left aside


def test_workers_saving_the_item_state_at_once_never_mix_their_blobs(tmp_path: Path) -> None:
    """Every worker of a group writes the item state: two saving at once (threads here) write aside
    under names of their own, so each save succeeds and the part is always one whole blob."""
    store = DiskCheckpointSet(tmp_path / "group")
    failures: list[BaseException] = []

    def save(writer: str) -> None:
        try:
            for n in range(40):
                blob = f"{writer} {n} ".encode() * 20_000
                asyncio.run(store.save_all({"items": blob, f"p{writer}": blob}))
        except BaseException as exc:
            failures.append(exc)

    writers = [threading.Thread(target=save, args=(writer,)) for writer in ("0", "1")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not failures
    items = asyncio.run(store.part("items").load())
    assert items is not None and items == items[: items.index(b" ", 2) + 1] * 20_000
    assert items.startswith((b"0 39 ", b"1 39 "))
    assert sorted(os.listdir(tmp_path / "group")) == ["items.npz", "p0.npz", "p1.npz"]


def test_a_redis_checkpoint_set_is_replaced_in_one_transaction(hermetic: Hermetic) -> None:
    large = os.urandom(2_500_000)  # written aside in three pieces

    async def scenario() -> list[bytes | None]:
        client = aioredis.Redis.from_url(hermetic.servers.redis_url)
        try:
            store = RedisCheckpointSet(client, f"{hermetic.prefix}:checkpoint:group")
            await store.save_all({"items": b"items", "p0": b"p0", "p1": b"p1"})
            assert await store.parts() == ["items", "p0", "p1"]
            appended, real_append = 0, client.append

            async def crash_at_the_third_piece(*args: Any) -> Any:
                nonlocal appended
                appended += 1
                if appended == 3:
                    raise ConnectionError("killed")
                return await real_append(*args)

            client.append = crash_at_the_third_piece  # type: ignore[method-assign]
            with pytest.raises(ConnectionError, match="killed"):
                await store.save_all({"items": large, "p0": large, "p1": b"p1 at t2"})
            before = [await store.part(name).load() for name in ("items", "p0", "p1")]
            assert before == [b"items", b"p0", b"p1"]
            assert await store.parts() == ["items", "p0", "p1"]  # what was written aside is not a part
            client.append = real_append  # type: ignore[method-assign]
            await store.save_all({"items": b"items at t3", "p0": large, "p1": b"p1 at t3"})
            await store.part("p1").save(large)
            keys = [key async for key in client.scan_iter(match=f"{hermetic.prefix}:checkpoint:group*")]
            assert len(keys) == 3 and [await client.ttl(key) for key in keys] == [-1] * 3  # kept for good
            return [await store.part(name).load() for name in ("items", "p0", "p1")]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"items at t3", large, large]
