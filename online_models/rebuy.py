"""Buying again: which items shoppers buy more than once, learned online.

Per item, how many purchases there were and how many of them repeated an earlier purchase by
the same shopper; the same per category, for items whose category the catalogue names. An item
a shopper bought once comes back into their list when its repeat share is at least ``min_share``
(coffee, milk); otherwise it stays out (a sofa). One they bought n times comes back with their
own chance, (n - 1 + share) / n (``online_models.related``). An item bought a few times borrows
its category's share, or the shop's: its share is (repeats + s) / (purchases + 1), where s is
the category's share (repeats + shop's) / (purchases + 1), or without a category the share of
all purchases that repeat one (a grocer's once-bought milk may come back; its once-bought sofa
not).

>>> again = BuyingAgain(min_share=0.3)
>>> for shopper_bought_before in [False, True, False, True, True]:
...     again.learn_one(row=0, again=shopper_bought_before)
>>> again.learn_one(row=1, again=False)
>>> [round(float(s), 2) for s in again.shares(np.array([0, 1, 7]))]   # the shop's share: 3/6
[0.58, 0.25, 0.0]
>>> grocer = BuyingAgain(min_share=0.2, category_of={0: "dairy", 1: "dairy", 2: "furniture"}.get)
>>> for row, bought_before in [(0, False), (0, True), (0, True), (2, False), (1, False)]:
...     grocer.learn_one(row, bought_before)
>>> # shop 2/5; dairy (2 + 0.4) / (4 + 1) = 0.48, furniture (0 + 0.4) / (1 + 1) = 0.2
>>> [round(float(s), 2) for s in grocer.shares(np.array([1, 2]))]  # new milk comes back, the sofa not
[0.24, 0.1]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _no_category(row: int) -> str | None:
    return None


class BuyingAgain:
    """Purchases and repeat purchases per item row, and per category (``category_of`` a row:
    the catalogue's, None when it names none)."""

    def __init__(
        self, min_share: float = 0.05, category_of: Callable[[int], str | None] = _no_category
    ) -> None:
        self.min_share, self.category_of = min_share, category_of
        self._purchases = np.zeros(1024, dtype=np.float64)
        self._repeats = np.zeros(1024, dtype=np.float64)
        self._tracked: list[tuple[int, bool]] | None = None  # purchases since the last take
        self._total = np.zeros(2)  # all purchases, and those that repeat one
        # Each bought row's category (-1: none), as the catalogue named it at its last purchase,
        # and per category its purchases and repeats.
        self._category = np.full(1024, -1, dtype=np.int64)
        self._category_ids: dict[str, int] = {}
        self._by_category = np.zeros((16, 2), dtype=np.float64)
        self.version = 0  # counts changes of the counts: what a memo of shares keys on

    def track_changes(self) -> None:
        """From now on remember every purchase learned (take_changes)."""
        self._tracked = []

    def take_changes(self) -> list[tuple[int, bool]]:
        tracked, self._tracked = self._tracked or [], ([] if self._tracked is not None else None)
        return tracked

    def discard_changes(self) -> None:
        """Take back the purchases learned since the last take (the group holds them already)."""
        if self._tracked:
            self.version += 1
        for row, again in self._tracked or []:
            self._purchases[row] -= 1.0
            self._repeats[row] -= float(again)
            self._total -= (1.0, float(again))
            self._count_category(row, -1.0, -float(again))
        if self._tracked is not None:
            self._tracked = []

    def learn_one(self, row: int, again: bool, share: bool = True) -> None:
        """A purchase of ``row``; ``again``: the shopper had bought it before; ``share=False``
        for one another worker learned."""
        self.version += 1
        if share and self._tracked is not None:
            self._tracked.append((row, again))
        if row >= self._purchases.size:
            grow = max(row + 1, 2 * self._purchases.size) - self._purchases.size
            self._purchases = np.concatenate([self._purchases, np.zeros(grow)])
            self._repeats = np.concatenate([self._repeats, np.zeros(grow)])
            self._category = np.concatenate([self._category, np.full(grow, -1, dtype=np.int64)])
        self._purchases[row] += 1.0
        self._total += (1.0, float(again))
        if again:
            self._repeats[row] += 1.0
        self._count_category(row, 1.0, float(again))

    def _count_category(self, row: int, purchases: float, repeats: float) -> None:
        """Add purchases of ``row`` (negative: take them back) to its category's counts."""
        name = self.category_of(row)
        if not name:
            return
        category = self._category_ids.get(name)
        if category is None:
            category = self._category_ids[name] = len(self._category_ids)
            if category >= len(self._by_category):
                self._by_category = np.concatenate([self._by_category, np.zeros_like(self._by_category)])
        self._category[row] = category
        self._by_category[category] += (purchases, repeats)

    def shares(self, rows: np.ndarray) -> np.ndarray:
        """The smoothed repeat share of each of ``rows`` (0 for an item never bought)."""
        if rows.size and rows.max() >= self._purchases.size:  # rows never bought: past the arrays
            out = np.zeros(len(rows), dtype=np.float64)
            counted = rows < self._purchases.size
            out[counted] = self.shares(rows[counted])
            return out
        shop = self._total[1] / self._total[0] if self._total[0] > 0 else 0.0
        # What an item bought a few times borrows: its category's share, else the shop's.
        category = self._category[rows]
        counts = self._by_category[category]  # (row -1 reads the last category: not used)
        prior = np.where(category >= 0, (counts[:, 1] + shop) / (counts[:, 0] + 1.0), shop)
        purchases = self._purchases[rows]
        share = (self._repeats[rows] + prior) / (purchases + 1.0)
        return np.where(purchases > 0, share, 0.0)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"rebuy_purchases": self._purchases.copy(), "rebuy_repeats": self._repeats.copy()}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.version += 1
        if "rebuy_purchases" in arrays:
            self._purchases = np.array(arrays["rebuy_purchases"], dtype=np.float64)
            self._repeats = np.array(arrays["rebuy_repeats"], dtype=np.float64)
        else:  # a checkpoint from before buying again was learned
            self._purchases = np.zeros(1024, dtype=np.float64)
            self._repeats = np.zeros(1024, dtype=np.float64)
        self._total = np.array([self._purchases.sum(), self._repeats.sum()])
        self._category = np.full(self._purchases.size, -1, dtype=np.int64)
        self._category_ids, self._by_category = {}, np.zeros((16, 2), dtype=np.float64)
        for row in np.flatnonzero(self._purchases).tolist():  # as the catalogue names them now
            self._count_category(row, float(self._purchases[row]), float(self._repeats[row]))
