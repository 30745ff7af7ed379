"""`pushrec bench`'s checkpoint figures: how long a checkpoint stops the model process, and how
long taking a partition takes, at a given number of users.

The worker checkpoints the item state, then one partition at a time, yielding to its event loop
between parts: the longest stall is the slowest part (packing it and writing it). Taking a
partition restores its part into a worker that already holds the item state.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from infra.settings import Settings


def checkpoint_costs(
    settings: Settings, users: int, partitions: int, items: int = 10_000, log: Any = None
) -> dict[str, Any]:
    """Build a model of ``users`` users (one click each, spread over ``partitions``) on ``items``
    items; time each checkpoint part and the restore of one partition."""
    import asyncio
    import random

    from consumers.recovery import (
        ITEMS,
        pack_items,
        pack_partition,
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
    recommender.drop_users(["filler"])
    started = time.perf_counter()
    for u in range(users):
        user, partition = f"u{u}", u % partitions
        recommender.learn_one(user, f"i{rng.randrange(items)}", "click", float(items + u))
        recommender.place(user, partition)
        seen.check_and_add(f"events:{partition}", f"e{u}", user)
        if log is not None and u and u % 200_000 == 0:
            log(f"checkpoint bench: {u:,} of {users:,} users learned")
    build_s = time.perf_counter() - started
    offsets = {f"events:{p}": users for p in range(partitions)}

    async def save_all(store: DiskCheckpointSet) -> dict[str, float]:
        took = {}
        for name in [ITEMS, *map(partition_part, range(partitions))]:
            started = time.perf_counter()
            if name == ITEMS:
                blob = pack_items(recommender)
            else:
                blob = pack_partition(recommender, seen, int(name[1:]), offsets, ())
            await store.part(name).save(blob)
            took[name] = time.perf_counter() - started
        return took

    with tempfile.TemporaryDirectory(prefix="pushrec-bench-checkpoint-") as directory:
        store = DiskCheckpointSet(Path(directory))
        took = asyncio.run(save_all(store))
        sizes = {name: (Path(directory) / f"{name}.npz").stat().st_size for name in took}
        fresh = build_recommender(settings)
        unpack_items((Path(directory) / f"{ITEMS}.npz").read_bytes(), fresh)
        started = time.perf_counter()
        blob = (Path(directory) / f"{partition_part(0)}.npz").read_bytes()
        unpack_partition(blob, fresh, SeenEventIds(settings.checkpoint.dedupe_ids), 0)
        restore_s = time.perf_counter() - started
    slowest = max(took, key=took.__getitem__)
    return {
        "users": users,
        "partitions": partitions,
        "items": items,
        "longest_stall_s": round(took[slowest], 4),
        "longest_stall_part": slowest,
        "items_part_s": round(took[ITEMS], 4),
        "checkpoint_total_s": round(sum(took.values()), 3),
        "partition_restore_s": round(restore_s, 4),
        "partition_bytes": sizes[partition_part(0)],
        "items_bytes": sizes[ITEMS],
        "model_build_s": round(build_s, 1),
    }
