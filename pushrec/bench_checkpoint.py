"""`pushrec bench`'s checkpoint figures: how long a checkpoint stops the model process, and how
long taking a partition takes, at a given number of users.

The worker checkpoints its partitions a few users at a time, yielding to its event loop between
slices while it goes on learning, then takes the users that changed meanwhile and the item
state in one cut (``consumers.recovery.checkpoint_live``). Here a task learns live events
meanwhile (``_LIVE_RATE`` clicks per second, in batches as they fall due), so the cut has work
to do; the stall is the longest the event loop could not run anything but that learning,
measured by a task that only yields. Taking a partition restores its part into a worker that
already holds the item state.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from infra.settings import Settings

_LIVE_RATE = 2_000  # events per second learned while the checkpoint runs


def checkpoint_costs(
    settings: Settings,
    users: int,
    partitions: int,
    items: int = 10_000,
    log: Any = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Build a model of ``users`` users (one click each, spread over ``partitions``) on ``items``
    items; time a checkpoint to disk, its save to Redis (``redis_url``: under a bench key, deleted
    after) and the restore of one partition."""
    from consumers.recovery import (
        ITEMS,
        checkpoint_live,
        partition_part,
        unpack_items,
        unpack_partition,
    )
    from consumers.worker import build_recommender
    from infra.checkpoint import DiskCheckpointSet
    from stream.dedupe import SeenEventIds

    rng = random.Random(0)
    recommender = build_recommender(settings)
    seen = SeenEventIds(settings.checkpoint.dedupe_ids)
    for i in range(items):
        recommender.learn_one("filler", f"i{i}", "view", float(i))
    recommender.users.drop(["filler"])
    started = time.perf_counter()
    for u in range(users):
        user, partition = f"u{u}", u % partitions
        recommender.learn_one(user, f"i{rng.randrange(items)}", "click", float(items + u))
        recommender.users.place(user, partition)
        seen.check_and_add(f"events:{partition}", f"e{u}", user)
        if log is not None and u and u % 200_000 == 0:
            log(f"checkpoint bench: {u:,} of {users:,} users learned")
    build_s = time.perf_counter() - started
    offsets = {f"events:{p}": users for p in range(partitions)}

    async def save_all(store: DiskCheckpointSet) -> tuple[float, float, int]:
        """(the longest the event loop waited, the whole checkpoint, events learned meanwhile), as
        the worker checkpoints while it learns."""
        done = asyncio.Event()
        learned, learning_s = 0, 0.0

        async def traffic() -> None:  # live events meanwhile: the cut has users that changed
            nonlocal learned, learning_s
            began = time.perf_counter()
            while not done.is_set():
                now = time.perf_counter()
                while learned < (now - began) * _LIVE_RATE:  # the events due by now, in a batch
                    u = rng.randrange(users)
                    recommender.learn_one(f"u{u}", f"i{rng.randrange(items)}", "click", float(items + users))
                    learned += 1
                learning_s += time.perf_counter() - now
                await asyncio.sleep(0)

        async def checkpoint() -> None:
            blobs = await checkpoint_live(recommender, seen, range(partitions), offsets, lambda: ())
            await store.save_all(blobs)  # as the worker saves them

        learn = asyncio.create_task(traffic())
        stall, total = await _longest_stall(checkpoint(), excluded=lambda: learning_s)
        done.set()
        await learn
        return stall, total, learned

    with tempfile.TemporaryDirectory(prefix="pushrec-bench-checkpoint-") as directory:
        store = DiskCheckpointSet(Path(directory))
        stall, total, learned = asyncio.run(save_all(store))
        fresh = build_recommender(settings)
        unpack_items((Path(directory) / f"{ITEMS}.npz").read_bytes(), fresh)
        started = time.perf_counter()
        blob = (Path(directory) / f"{partition_part(0)}.npz").read_bytes()
        unpack_partition(blob, fresh, SeenEventIds(settings.checkpoint.dedupe_ids), 0)
        restore_s = time.perf_counter() - started
        partition_bytes = len(blob)
        items_bytes = (Path(directory) / f"{ITEMS}.npz").stat().st_size
        redis_save = {}
        if redis_url:
            names = [ITEMS, *(partition_part(p) for p in range(partitions))]
            written = {name: (Path(directory) / f"{name}.npz").read_bytes() for name in names}
            stall_s, save_s = asyncio.run(
                _save_to_redis(redis_url, f"{settings.redis.key_prefix}:bench", written)
            )
            redis_save = {"redis_save_stall_s": round(stall_s, 4), "redis_save_s": round(save_s, 3)}
    return {
        "users": users,
        "partitions": partitions,
        "items": items,
        "longest_stall_s": round(stall, 4),
        "checkpoint_total_s": round(total, 3),
        "events_learned_meanwhile": learned,
        "partition_restore_s": round(restore_s, 4),
        "partition_bytes": partition_bytes,
        "items_bytes": items_bytes,
        "model_build_s": round(build_s, 1),
        **redis_save,
    }


async def _save_to_redis(url: str, key: str, blobs: dict[str, bytes]) -> tuple[float, float]:
    """(the longest the event loop waited, the whole save) for ``blobs`` saved as the worker
    saves a checkpoint set to Redis; the keys are deleted after."""
    import redis.asyncio as aioredis

    from infra.checkpoint import RedisCheckpointSet

    client = aioredis.Redis.from_url(url)
    try:
        stall_total = await _longest_stall(RedisCheckpointSet(client, key).save_all(blobs))
        await client.delete(*(f"{key}:{name}" for name in blobs))
    finally:
        await client.aclose()
    return stall_total


async def _longest_stall(
    work: Awaitable[None], excluded: Callable[[], float] = lambda: 0.0
) -> tuple[float, float]:
    """(the longest the event loop could not run anything else, the time ``work`` took), from a
    task that only yields; ``excluded()``: the seconds spent so far on other work not to count."""
    gaps, done = [0.0], asyncio.Event()

    async def ticker() -> None:
        last, excluded_then = time.perf_counter(), excluded()
        while not done.is_set():
            await asyncio.sleep(0)
            now, excluded_now = time.perf_counter(), excluded()
            gaps.append(now - last - (excluded_now - excluded_then))
            last, excluded_then = now, excluded_now

    watch = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    await work
    total = time.perf_counter() - started
    done.set()
    await watch
    return max(gaps), total
