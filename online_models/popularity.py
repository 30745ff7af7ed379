"""Time-decayed item popularity: the cold-user list, a part of the blend, and a baseline.

>>> pop = Popularity(half_life_s=10.0)
>>> pop.learn_one(0, weight=1.0, ts=0.0)
>>> pop.learn_one(1, weight=1.0, ts=10.0)
>>> pop.learn_one(1, weight=1.0, ts=10.0)
>>> [round(float(s), 3) for s in pop.scores()]
[0.5, 2.0]
>>> blended = np.zeros(3, dtype=np.float32)
>>> pop.add_normalised(blended, weight=2.0)
>>> blended.tolist()             # 2 · pop / max pop; row 2 has no events yet
[0.5, 2.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Counts are stored scaled by 2**(age/half_life) from a reference time, in float32; rescale
# before that factor nears float32's range (3.4e38 ~ 2**128). Ranking ignores the scale.
_MAX_EXPONENT = 64.0


class Popularity:
    """Exponentially decayed event counts per item row (rows come from the shared item index)."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._raw = np.zeros(1024, dtype=np.float32)
        self._size = 0
        self._max = 0.0
        self._t_ref: float | None = None
        self._t_latest = 0.0
        # (row, weight, ts) of every count since tracking started (see take_counts); None: off.
        self._counts: list[tuple[int, float, float]] | None = None

    def track_counts(self) -> None:
        """From now on remember every count learned (take_counts), to share with other shards."""
        self._counts = []

    def take_counts(self) -> list[tuple[int, float, float]]:
        """The (row, weight, ts) counts learned since tracking started or the last call."""
        if self._counts is None:
            return []
        counts, self._counts = self._counts, []
        return counts

    def learn_one(self, row: int, weight: float, ts: float, share: bool = True) -> None:
        """Count one event on ``row``; ``share=False`` for a count another shard learned."""
        if share and self._counts is not None:
            self._counts.append((row, weight, ts))
        if self._t_ref is None:
            self._t_ref = self._t_latest = ts
        self._t_latest = max(self._t_latest, ts)
        exponent = (ts - self._t_ref) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            scale = 2.0 ** (-exponent)
            self._raw[: self._size] *= scale
            self._max *= scale
            self._t_ref, exponent = ts, 0.0
        if row >= self._raw.size:
            grown = np.zeros(max(row + 1, 2 * self._raw.size), dtype=np.float32)
            grown[: self._size] = self._raw[: self._size]
            self._raw = grown
        self._size = max(self._size, row + 1)
        # Out-of-order events (exponent < 0) simply count for less.
        self._raw[row] += weight * math.pow(2.0, exponent)
        self._max = max(self._max, float(self._raw[row]))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"max": self._max, "t_ref": self._t_ref, "t_latest": self._t_latest}
        return meta, {"counts": self._raw[: self._size].copy()}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        counts = np.asarray(arrays["counts"], dtype=np.float32)
        self._size = counts.size
        self._raw = np.zeros(max(1024, 2 * counts.size), dtype=np.float32)
        self._raw[: counts.size] = counts
        self._max, self._t_ref, self._t_latest = meta["max"], meta["t_ref"], meta["t_latest"]

    def scores(self) -> np.ndarray:
        """Decayed counts per row as of the newest event seen."""
        if self._t_ref is None:
            return self._raw[:0].copy()
        age = (self._t_latest - self._t_ref) / self.half_life_s
        return self._raw[: self._size] / np.float32(2.0**age)

    def add_normalised(self, scores: np.ndarray, weight: float, rows: np.ndarray | None = None) -> None:
        """``scores += weight · pop / max pop`` in place (pop in [0, 1], 1 for the top item);
        ``scores[j]`` belongs to row ``rows[j]`` if ``rows`` is given, else to row ``j``."""
        if self._max <= 0:
            return
        scale = np.float32(weight / self._max)
        if rows is None:
            scores[: self._size] += scale * self._raw[: self._size]
        else:
            known = rows < self._size
            scores[known] += scale * self._raw[rows[known]]
