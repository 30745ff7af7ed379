"""Time-decayed item popularity: the cold-user list and a baseline.

>>> pop = Popularity(half_life_s=10.0)
>>> pop.learn_one(0, weight=1.0, ts=0.0)
>>> pop.learn_one(1, weight=1.0, ts=10.0)
>>> pop.learn_one(1, weight=1.0, ts=10.0)
>>> [round(float(s), 3) for s in pop.scores()]
[0.5, 2.0]
"""

from __future__ import annotations

import math

import numpy as np

# Keep the growth factor 2**(age/half_life) far from float64 overflow; ranking ignores the scale.
_MAX_EXPONENT = 512.0


class Popularity:
    """Exponentially decayed event counts per item row (rows come from the shared item index)."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._raw = np.zeros(1024, dtype=np.float64)
        self._size = 0
        self._t_ref: float | None = None
        self._t_latest = 0.0

    def learn_one(self, row: int, weight: float, ts: float) -> None:
        if self._t_ref is None:
            self._t_ref = self._t_latest = ts
        self._t_latest = max(self._t_latest, ts)
        exponent = (ts - self._t_ref) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            self._raw[: self._size] *= 2.0 ** (-exponent)
            self._t_ref, exponent = ts, 0.0
        if row >= self._raw.size:
            grown = np.zeros(max(row + 1, 2 * self._raw.size), dtype=np.float64)
            grown[: self._size] = self._raw[: self._size]
            self._raw = grown
        self._size = max(self._size, row + 1)
        # Out-of-order events (exponent < 0) simply count for less.
        self._raw[row] += weight * math.pow(2.0, exponent)

    def scores(self) -> np.ndarray:
        """Decayed counts per row as of the newest event seen."""
        if self._t_ref is None:
            return self._raw[:0].copy()
        age = (self._t_latest - self._t_ref) / self.half_life_s
        return self._raw[: self._size] / 2.0**age
