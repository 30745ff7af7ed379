"""Items that go together, learned online: sequential rules over each shopper's last items.

Each positive event on item i adds ``weight / d`` to the rule j -> i for each of the shopper's
``window`` previous items j, d steps back (session-rec's sequential rules, weighted by event type
and decayed in event time). A shopper's candidates are the rules from their last items, the
latest counting most (1/d again), scaled so the strongest is 1. Each item keeps its strongest
``neighbours`` rules (pruned when it holds twice as many): memory and time per event are bounded.

Time decay as in ``online_models.popularity``: values are stored scaled by 2**(age/half-life) from
a reference time, so old rules fade against new ones without touching them.

>>> rules = CoVisitation(window=3, neighbours=10, half_life_s=1e9)
>>> for user, items in [("a", [1, 2, 3]), ("b", [1, 2]), ("c", [1, 3])]:
...     for n, item in enumerate(items):
...         rules.learn_one(items[:n], item, weight=1.0, ts=0.0)
>>> rows, scores, sources = rules.scores([1])
>>> dict(zip(rows.tolist(), scores.tolist()))    # 1 -> 2: 1 + 1; 1 -> 3: 1/2 + 1
{2: 1.0, 3: 0.75}
>>> sources.tolist()
[1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_EXPONENT = 64.0  # rescale before 2**exponent nears float64's range


class CoVisitation:
    """Rules j -> i between item rows, from the order in which shoppers engage with items."""

    def __init__(self, window: int = 5, neighbours: int = 30, half_life_s: float = 30 * 86_400.0) -> None:
        self.window = window
        self.neighbours = neighbours
        self.half_life_s = half_life_s
        self._rules: dict[int, dict[int, float]] = {}
        self._t_ref: float | None = None
        # What learning added since tracking started or the last take, per (source, target), at
        # this model's scale (see take_changes); None: not tracking.
        self._tracked: dict[tuple[int, int], float] | None = None

    def __len__(self) -> int:
        return len(self._rules)

    def learn_one(self, previous: Sequence[int], row: int, weight: float, ts: float) -> None:
        """A positive event on ``row`` after the shopper's ``previous`` rows (oldest first)."""
        if not previous or weight <= 0:
            return
        if self._t_ref is None:
            self._t_ref = ts
        exponent = (ts - self._t_ref) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            self._rescale(2.0**-exponent)
            self._t_ref, exponent = ts, 0.0
        scaled = weight * 2.0**exponent
        tracked = self._tracked
        for distance, earlier in enumerate(reversed(previous[-self.window :]), start=1):
            if earlier != row:
                self._add(earlier, row, scaled / distance)
                if tracked is not None:
                    tracked[earlier, row] = tracked.get((earlier, row), 0.0) + scaled / distance

    def _add(self, source: int, target: int, value: float) -> None:
        rules = self._rules.setdefault(source, {})
        rules[target] = rules.get(target, 0.0) + value
        if len(rules) > 2 * self.neighbours:
            strongest = sorted(rules.items(), key=lambda rule: -rule[1])[: self.neighbours]
            self._rules[source] = dict(strongest)

    # --- one item state for several workers (online_models.item_sync) --------------------------

    @property
    def changed_rules(self) -> int:
        """Rules learning added to since tracking started or the last take."""
        return len(self._tracked or ())

    def track_changes(self) -> None:
        """From now on remember what learning adds (take_changes)."""
        self._tracked = {}

    def take_changes(self) -> tuple[list[tuple[int, int]], list[float], float | None]:
        """The (source, target) rules learning added to since the last take, the amounts, and
        the reference time they are scaled to (see the module docstring)."""
        tracked, self._tracked = self._tracked or {}, ({} if self._tracked is not None else None)
        return list(tracked), list(tracked.values()), self._t_ref

    def add_changes(
        self, pairs: Sequence[tuple[int, int]], values: Sequence[float], t_ref: float | None
    ) -> None:
        """Add another worker's :meth:`take_changes` (rows in this model's numbering)."""
        if t_ref is None or not pairs:
            return
        if self._t_ref is None:
            self._t_ref = t_ref
        factor = 2.0 ** ((t_ref - self._t_ref) / self.half_life_s)
        for (source, target), value in zip(pairs, values, strict=True):
            self._add(source, target, value * factor)

    def discard_changes(self) -> None:
        """Take back what learning added since the last take (the group holds it already)."""
        for (source, target), value in (self._tracked or {}).items():
            rules = self._rules.get(source)
            if rules is not None and target in rules:
                rules[target] -= value
                if rules[target] <= 1e-9 * value:  # what is left is the subtraction's rounding
                    del rules[target]
        if self._tracked is not None:
            self._tracked = {}

    def scores(self, last: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates from the shopper's ``last`` rows (oldest first): their rows, scores in
        (0, 1] and, for each, the last row that contributed most (for the reason)."""
        totals: dict[int, float] = {}
        best: dict[int, tuple[float, int]] = {}
        for distance, source in enumerate(reversed(last), start=1):
            for row, value in self._rules.get(source, {}).items():
                share = value / distance
                totals[row] = totals.get(row, 0.0) + share
                if share > best.get(row, (0.0, -1))[0]:
                    best[row] = (share, source)
        for row in last:  # the last items themselves are the recent-interest part's job
            totals.pop(row, None)
        if not totals:
            empty = np.empty(0, dtype=np.int64)
            return empty, np.empty(0, dtype=np.float64), empty
        rows = np.fromiter(totals, dtype=np.int64, count=len(totals))
        values = np.fromiter(totals.values(), dtype=np.float64, count=len(totals))
        sources = np.fromiter((best[row][1] for row in totals), dtype=np.int64, count=len(totals))
        return rows, values / values.max(), sources

    def _rescale(self, factor: float) -> None:
        for rules in self._rules.values():
            for row in rules:
                rules[row] *= factor
        for key in self._tracked or {}:
            self._tracked[key] *= factor  # type: ignore[index]

    def state(self) -> dict[str, Any]:
        """Every rule, as JSON (a copy: it may be serialised in another thread)."""
        return {
            "t_ref": self._t_ref,
            "rules": [[source, list(rules), list(rules.values())] for source, rules in self._rules.items()],
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Load :meth:`state` (rows as the item index restored with it numbers them)."""
        self._rules, self._t_ref = {}, None
        if state:
            self._t_ref = state["t_ref"]
            for source, rows, values in state["rules"]:
                self._rules[source] = dict(zip(rows, values, strict=True))
