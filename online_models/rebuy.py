"""Buying again: which items shoppers buy more than once, learned online.

Per item, how many purchases there were and how many of them repeated an earlier purchase by
the same shopper. An item a shopper bought comes back into their list when its repeat share is
at least ``min_share`` (coffee, milk); otherwise it stays out once bought (a sofa). Its score
grows with the share and with how often this shopper bought it. An item bought a few times
borrows the shop's: its share is (repeats + s) / (purchases + 1), where s is the share of all
purchases that repeat one (a grocer's once-bought item may come back; a furniture shop's not).

>>> again = BuyingAgain(min_share=0.3)
>>> for shopper_bought_before in [False, True, False, True, True]:
...     again.learn_one(row=0, again=shopper_bought_before)
>>> again.learn_one(row=1, again=False)
>>> [round(float(s), 2) for s in again.shares(np.array([0, 1, 7]))]   # the shop's share: 3/6
[0.58, 0.25, 0.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np


class BuyingAgain:
    """Purchases and repeat purchases per item row."""

    def __init__(self, min_share: float = 0.05) -> None:
        self.min_share = min_share
        self._purchases = np.zeros(1024, dtype=np.float64)
        self._repeats = np.zeros(1024, dtype=np.float64)
        self._tracked: list[tuple[int, bool]] | None = None  # purchases since the last take
        self._total = np.zeros(2)  # all purchases, and those that repeat one

    def track_changes(self) -> None:
        """From now on remember every purchase learned (take_changes)."""
        self._tracked = []

    def take_changes(self) -> list[tuple[int, bool]]:
        tracked, self._tracked = self._tracked or [], ([] if self._tracked is not None else None)
        return tracked

    def discard_changes(self) -> None:
        """Take back the purchases learned since the last take (the group holds them already)."""
        for row, again in self._tracked or []:
            self._purchases[row] -= 1.0
            self._repeats[row] -= float(again)
            self._total -= (1.0, float(again))
        if self._tracked is not None:
            self._tracked = []

    def learn_one(self, row: int, again: bool, share: bool = True) -> None:
        """A purchase of ``row``; ``again``: the shopper had bought it before; ``share=False``
        for one another worker learned."""
        if share and self._tracked is not None:
            self._tracked.append((row, again))
        if row >= self._purchases.size:
            size = max(row + 1, 2 * self._purchases.size)
            self._purchases = np.concatenate([self._purchases, np.zeros(size - self._purchases.size)])
            self._repeats = np.concatenate([self._repeats, np.zeros(size - self._repeats.size)])
        self._purchases[row] += 1.0
        self._total += (1.0, float(again))
        if again:
            self._repeats[row] += 1.0

    def shares(self, rows: np.ndarray) -> np.ndarray:
        """The smoothed repeat share of each of ``rows`` (0 for an item never bought)."""
        known = rows < self._purchases.size
        out = np.zeros(len(rows), dtype=np.float64)
        shop = self._total[1] / self._total[0] if self._total[0] > 0 else 0.0
        out[known] = (self._repeats[rows[known]] + shop) / (self._purchases[rows[known]] + 1.0)
        out[known & (self._purchases[np.minimum(rows, self._purchases.size - 1)] == 0)] = 0.0
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"rebuy_purchases": self._purchases.copy(), "rebuy_repeats": self._repeats.copy()}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        if "rebuy_purchases" in arrays:
            self._purchases = np.array(arrays["rebuy_purchases"], dtype=np.float64)
            self._repeats = np.array(arrays["rebuy_repeats"], dtype=np.float64)
        else:  # a checkpoint from before buying again was learned
            self._purchases = np.zeros(1024, dtype=np.float64)
            self._repeats = np.zeros(1024, dtype=np.float64)
        self._total = np.array([self._purchases.sum(), self._repeats.sum()])
