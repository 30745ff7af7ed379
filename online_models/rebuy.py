"""Buying again: which items shoppers buy more than once, and after how long, learned online.

Per item, how many purchases there were, how many of them repeated an earlier purchase by the
same shopper, and how long after it. An item a shopper bought comes back into their list when
its repeat share is at least ``min_share`` (coffee, milk); otherwise it stays out once bought (a
sofa). Its score grows with the share, with how often this shopper bought it, and with how near
its usual interval is: bought half an interval ago, half the score; an interval or more ago,
all of it (time to restock). An item bought a few times borrows the shop's figures: its share is
(repeats + s) / (purchases + 1), where s is the share of all purchases that repeat one (a
grocer's once-bought item may come back; a furniture shop's not), and its interval the geometric
mean of its own gaps and the shop's, counted once.

>>> again = BuyingAgain(min_share=0.3)
>>> for gap in [None, 86_400.0, None, 4 * 86_400.0, 2 * 86_400.0]:   # a day, 4 days, 2 days
...     again.learn_one(row=0, gap=gap)
>>> again.learn_one(row=1, gap=None)
>>> [round(float(s), 2) for s in again.shares(np.array([0, 1, 7]))]   # the shop's share: 3/6
[0.58, 0.25, 0.0]
>>> [round(float(d) / 86_400, 1) for d in again.intervals(np.array([0, 1]))]  # in days
[2.0, 2.0]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_SHORTEST_GAP_S = 60.0  # two purchases within a minute are one basket
DUE_FROM = 0.5  # share of its usual interval after which a bought item comes back


class BuyingAgain:
    """Purchases, repeat purchases and the gaps before them, per item row."""

    def __init__(self, min_share: float = 0.05) -> None:
        self.min_share = min_share
        self._purchases = np.zeros(1024, dtype=np.float64)
        self._repeats = np.zeros(1024, dtype=np.float64)
        self._log_gaps = np.zeros(1024, dtype=np.float64)  # sum of log2(seconds) before each repeat
        self._tracked: list[tuple[int, float | None]] | None = None  # purchases since the last take
        self._total = np.zeros(3)  # all purchases, those that repeat one, the sum of their log gaps

    def track_changes(self) -> None:
        """From now on remember every purchase learned (take_changes)."""
        self._tracked = []

    def take_changes(self) -> list[tuple[int, float | None]]:
        """The (row, gap) purchases learned since the last take (gap None: a first purchase)."""
        tracked, self._tracked = self._tracked or [], ([] if self._tracked is not None else None)
        return tracked

    def discard_changes(self) -> None:
        """Take back the purchases learned since the last take (the group holds them already)."""
        for row, gap in self._tracked or []:
            self._count(row, gap, -1.0)
        if self._tracked is not None:
            self._tracked = []

    def learn_one(self, row: int, gap: float | None, share: bool = True) -> None:
        """A purchase of ``row``, ``gap`` seconds after the shopper's last purchase of it (None:
        their first); ``share=False`` for one another worker learned."""
        if share and self._tracked is not None:
            self._tracked.append((row, gap))
        if row >= self._purchases.size:
            size = max(row + 1, 2 * self._purchases.size)
            grow = np.zeros(size - self._purchases.size)
            self._purchases, self._repeats, self._log_gaps = (
                np.concatenate([values, grow]) for values in (self._purchases, self._repeats, self._log_gaps)
            )
        self._count(row, gap, 1.0)

    def _count(self, row: int, gap: float | None, sign: float) -> None:
        self._purchases[row] += sign
        self._total[0] += sign
        if gap is not None:
            log_gap = math.log2(max(gap, _SHORTEST_GAP_S))
            self._repeats[row] += sign
            self._log_gaps[row] += sign * log_gap
            self._total[1:] += (sign, sign * log_gap)

    def shares(self, rows: np.ndarray) -> np.ndarray:
        """The smoothed repeat share of each of ``rows`` (0 for an item never bought)."""
        known = rows < self._purchases.size
        out = np.zeros(len(rows), dtype=np.float64)
        shop = self._total[1] / self._total[0] if self._total[0] > 0 else 0.0
        out[known] = (self._repeats[rows[known]] + shop) / (self._purchases[rows[known]] + 1.0)
        out[known & (self._purchases[np.minimum(rows, self._purchases.size - 1)] == 0)] = 0.0
        return out

    def intervals(self, rows: np.ndarray) -> np.ndarray:
        """The usual seconds between two purchases of each of ``rows`` by one shopper (0 while the
        shop has no repeat purchase)."""
        if self._total[1] <= 0:
            return np.zeros(len(rows), dtype=np.float64)
        shop = self._total[2] / self._total[1]
        known = rows[rows < self._purchases.size]
        logs = np.full(len(rows), shop)
        logs[rows < self._purchases.size] = (self._log_gaps[known] + shop) / (self._repeats[known] + 1.0)
        return np.exp2(logs)

    def timing(self, rows: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        """How due each of ``rows`` is, ``elapsed`` seconds after the shopper last bought it:
        the share of its usual interval gone by, up to 1; 0 (not due) below ``DUE_FROM``."""
        intervals = self.intervals(rows)
        share = np.minimum(elapsed / np.maximum(intervals, 1e-9), 1.0)
        share[intervals <= 0] = 1.0
        return np.where(share >= DUE_FROM, share, 0.0)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {
            "rebuy_purchases": self._purchases.copy(),
            "rebuy_repeats": self._repeats.copy(),
            "rebuy_log_gaps": self._log_gaps.copy(),
        }

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        if "rebuy_purchases" in arrays:
            self._purchases = np.array(arrays["rebuy_purchases"], dtype=np.float64)
            self._repeats = np.array(arrays["rebuy_repeats"], dtype=np.float64)
        else:  # a checkpoint from before buying again was learned
            self._purchases = np.zeros(1024, dtype=np.float64)
            self._repeats = np.zeros(1024, dtype=np.float64)
        # Before 2026-12-02 the gaps were not learned: the repeats count as gaps of a day.
        default = self._repeats * math.log2(86_400.0)
        self._log_gaps = np.array(arrays.get("rebuy_log_gaps", default), dtype=np.float64)
        self._total = np.array([self._purchases.sum(), self._repeats.sum(), self._log_gaps.sum()])
