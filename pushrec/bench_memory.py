"""`pushrec bench`'s memory figure: bytes the worker keeps per user and per item."""

from __future__ import annotations

from typing import Any

from infra.settings import Settings


def model_memory(
    settings: Settings, points: tuple[int, int] = (10_000, 50_000), events_per_user: int = 3
) -> dict[str, Any]:
    """Bytes the worker's model holds per user and per item, measured with tracemalloc (numpy
    arrays included) as the slope between two sizes, and extrapolated linearly to 1M users.
    Everything kept per user counts: the model's state and the last list served to each user
    (the pipeline keeps it for the live hit rate)."""
    import random
    import tracemalloc
    from types import SimpleNamespace

    from consumers.worker import build_pipeline

    def held(users: int, items: int) -> int:
        rng = random.Random(0)
        tracemalloc.start()
        pipeline = build_pipeline(settings)
        for i in range(items):  # every item learned once by a catalogue-filler user
            pipeline.recommender.learn_one("filler", f"i{i}", "view", float(i))
        clock = float(items)
        for u in range(users):
            events = []
            for _ in range(events_per_user):
                clock += 1.0
                item = f"i{rng.randrange(items)}"
                events.append(
                    SimpleNamespace(user_id=f"u{u}", item_id=item, type="click", ts=clock, rating=None)
                )
            pipeline.process(events)  # learn, then re-rank and remember the list served
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del pipeline
        return size

    small, large = points
    base_items = 10_000
    at_small = held(small, base_items)
    per_user = (held(large, base_items) - at_small) / (large - small)
    per_item = (held(small, 5 * base_items) - at_small) / (4 * base_items)
    return {
        "bytes_per_user": round(per_user),
        "bytes_per_item": round(per_item),
        "model_bytes_measured": {
            str(small): at_small,
            str(large): round(at_small + per_user * (large - small)),
        },
        "model_bytes_1m_users_extrapolated": round(at_small + per_user * (1_000_000 - small)),
        "memory_method": f"tracemalloc slope between {small:,} and {large:,} users "
        f"({events_per_user} events each, then their list served) and between 10k and 50k items; "
        "1M users extrapolated linearly",
    }
