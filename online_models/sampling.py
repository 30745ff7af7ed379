"""Negative sampling for the online MF (uniform over the stream's items, or by recent
popularity), and the JSON form of the random generators the model checkpoints.

>>> sampler = NegativeSampler(count=2, popular_share=0.0, seed=0)
>>> sampler.sample(["a", "b", "c"], stream_rows=None)
['b', 'b']
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def rng_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as JSON (for checkpoints)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class RecentPositives:
    """A ring of recent positive item rows: a draw from it is a draw by recent popularity."""

    def __init__(self, size: int = 10_000) -> None:
        self._rows: list[int] = []
        self._size = size
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, row: int) -> None:
        if len(self._rows) < self._size:
            self._rows.append(row)
        else:
            self._rows[self._next] = row
            self._next = (self._next + 1) % self._size

    def draw(self, rng: random.Random) -> int:
        return self._rows[rng.randrange(len(self._rows))]

    def state(self) -> list[int]:
        return [self._next, *self._rows]

    def restore(self, state: list[int]) -> None:
        self._next, self._rows = state[0], list(state[1:])


class NegativeSampler:
    """``count`` negatives per positive: a ``popular_share`` of them drawn from recent positives,
    the rest uniformly from the items seen in the stream."""

    def __init__(self, count: int, popular_share: float, seed: int) -> None:
        self.count = count
        self.popular_share = popular_share
        self.rng = random.Random(seed)
        self.positives = RecentPositives()

    def sample(self, ids: Sequence[str], stream_rows: Sequence[int] | None) -> list[str]:
        """Negatives come from items seen in the stream (``stream_rows``; None = every row of
        ``ids``): an item nobody touched is not evidence of anything, and keeps its cold start."""
        size = len(ids) if stream_rows is None else len(stream_rows)
        if size < 2:
            return []
        rng, positives = self.rng, self.positives
        return [
            ids[positives.draw(rng)]
            if positives and rng.random() < self.popular_share
            else ids[rng.randrange(size) if stream_rows is None else stream_rows[rng.randrange(size)]]
            for _ in range(self.count)
        ]

    def state(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "positives": self.positives.state()}

    def restore(self, meta: dict[str, Any]) -> None:
        set_rng_state(self.rng, meta["rng"])
        self.positives.restore(meta["positives"])
