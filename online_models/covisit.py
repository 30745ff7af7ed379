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
>>> rows, scores = rules.scores([1])
>>> dict(zip(rows.tolist(), scores.tolist()))    # 1 -> 2: 1 + 1; 1 -> 3: 1/2 + 1
{2: 1.0, 3: 0.75}
>>> rules.sources([1], rows.tolist())
[1, 1]
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_EXPONENT = 64.0  # rescale before 2**exponent nears float64's range
_EMPTY_ROWS = np.empty(0, dtype=np.int64)


class CoVisitation:
    """Rules j -> i between item rows, from the order in which shoppers engage with items.

    The rules of a source row are one ``array('d')`` of (target, value) pairs: 16 bytes a rule
    and one small array per source, instead of a dict entry, an int and a float (~100 bytes)."""

    def __init__(self, window: int = 5, neighbours: int = 30, half_life_s: float = 30 * 86_400.0) -> None:
        self.window = window
        self.neighbours = neighbours
        self.half_life_s = half_life_s
        self._rules: dict[int, array[float]] = {}
        self._t_ref: float | None = None
        # What learning added since tracking started or the last take, as (source, target, value)
        # triples at this model's scale (see take_changes); None: not tracking.
        self._tracked: array[float] | None = None
        self.version = 0  # counts changes of the rules: what a memo of their scores keys on

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
                    tracked.extend((earlier, row, scaled / distance))

    def _add(self, source: int, target: int, value: float) -> None:
        self.version += 1
        rules = self._rules.get(source)
        if rules is None:
            self._rules[source] = array("d", (target, value))
            return
        at = _value_at(rules, target)
        if at is not None:
            rules[at] += value
            return
        rules.extend((target, value))
        if len(rules) > 4 * self.neighbours:  # twice the neighbours kept: prune to them
            pairs = np.array(rules).reshape(-1, 2)
            strongest = pairs[np.argsort(-pairs[:, 1], kind="stable")[: self.neighbours]]
            self._rules[source] = array("d", strongest.ravel().tobytes())

    # --- one item state for several workers (online_models.item_sync) --------------------------

    @property
    def changed_rules(self) -> int:
        """Rule additions learned since tracking started or the last take."""
        return len(self._tracked) // 3 if self._tracked is not None else 0

    def track_changes(self) -> None:
        """From now on remember what learning adds (take_changes)."""
        self._tracked = array("d")

    def take_changes(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        """The (source, target) rules learning added to since the last take (an (n, 2) array of
        rows), the amounts, and the reference time they are scaled to (module docstring)."""
        if self._tracked is None:
            return np.empty((0, 2), dtype=np.int64), np.empty(0), self._t_ref
        triples, self._tracked = self._tracked, array("d")
        pairs, values = _summed(triples)
        return pairs, values, self._t_ref

    def add_changes(self, pairs: np.ndarray, values: np.ndarray, t_ref: float | None) -> None:
        """Add another worker's :meth:`take_changes` (rows in this model's numbering)."""
        if t_ref is None or not len(pairs):
            return
        if self._t_ref is None:
            self._t_ref = t_ref
        factor = 2.0 ** ((t_ref - self._t_ref) / self.half_life_s)
        add = self._add
        for (source, target), value in zip(pairs.tolist(), (values * factor).tolist(), strict=True):
            add(source, target, value)

    def discard_changes(self) -> None:
        """Take back what learning added since the last take (the group holds it already)."""
        if not self._tracked:
            return
        self.version += 1
        pairs, values = _summed(self._tracked)
        self._tracked = array("d")
        for (source, target), value in zip(pairs.tolist(), values.tolist(), strict=True):
            rules = self._rules.get(source)
            if rules is None or (at := _value_at(rules, target)) is None:  # pruned meanwhile
                continue
            rules[at] -= value
            if rules[at] <= 1e-9 * value:  # what is left is the subtraction's rounding
                del rules[at - 1 : at + 1]
                if not rules:
                    del self._rules[source]

    def scores(self, last: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the shopper's ``last`` rows (oldest first): their rows and scores in
        (0, 1]."""
        totals: dict[float, float] = {}  # keyed by the rules' float rows (equal to the ints)
        get = totals.get
        for distance, source in enumerate(reversed(last), start=1):
            rules = self._rules.get(source)
            if rules is None:
                continue
            pairs = rules.tolist()
            for target, value in zip(pairs[::2], pairs[1::2], strict=True):
                totals[target] = get(target, 0.0) + value / distance
        for row in last:  # the last items themselves are the recent-interest part's job
            totals.pop(row, None)
        if not totals:
            return _EMPTY_ROWS, np.empty(0, dtype=np.float64)
        rows = np.fromiter(totals, dtype=np.int64, count=len(totals))
        values = np.fromiter(totals.values(), dtype=np.float64, count=len(totals))
        return rows, values / values.max()

    def sources(self, last: Sequence[int], rows: Sequence[int]) -> list[int]:
        """For each of ``rows`` (candidates of :meth:`scores`), the one of ``last`` whose rule
        added most to its score (the nearest on a tie): what its reason names."""
        out = []
        for row in rows:
            best, source = 0.0, -1
            for distance, earlier in enumerate(reversed(last), start=1):
                rules = self._rules.get(earlier)
                if rules is None or (at := _value_at(rules, row)) is None:
                    continue
                if (share := rules[at] / distance) > best:
                    best, source = share, earlier
            out.append(source)
        return out

    def _rescale(self, factor: float) -> None:
        self.version += 1
        for source, rules in self._rules.items():
            self._rules[source] = array("d", (np.array(rules).reshape(-1, 2) * (1.0, factor)).tobytes())
        if self._tracked:
            self._tracked = array(
                "d", (np.array(self._tracked).reshape(-1, 3) * (1.0, 1.0, factor)).tobytes()
            )

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Every rule: the reference time, and arrays (copies: they may be serialised in another
        thread) of the sources, how many rules each has, and their (target, value) pairs."""
        sources = np.fromiter(self._rules, dtype=np.int64, count=len(self._rules))
        sizes = np.fromiter((len(r) // 2 for r in self._rules.values()), dtype=np.int64, count=len(sources))
        pairs = np.frombuffer(b"".join(r.tobytes() for r in self._rules.values()), dtype=np.float64)
        arrays = {"covisit_sources": sources, "covisit_sizes": sizes, "covisit_pairs": pairs}
        return {"t_ref": self._t_ref}, arrays

    def restore(self, meta: dict[str, Any] | None, arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` (rows as the item index restored with it numbers them)."""
        self.version += 1
        self._rules, self._t_ref = {}, (meta or {}).get("t_ref")
        if meta and "rules" in meta:  # a checkpoint of pushrec 2026-12-01 (rules as JSON lists)
            for source, rows, values in meta["rules"]:
                self._rules[source] = array("d", np.column_stack([rows, values]).ravel().tobytes())
            return
        if "covisit_sources" not in arrays:
            return
        data = np.asarray(arrays["covisit_pairs"], dtype=np.float64).tobytes()
        sizes = np.asarray(arrays["covisit_sizes"], dtype=np.int64) * 16  # bytes of each source's pairs
        ends = np.cumsum(sizes)
        for source, start, end in zip(
            arrays["covisit_sources"].tolist(), (ends - sizes).tolist(), ends.tolist(), strict=True
        ):
            self._rules[source] = array("d", data[start:end])


def _value_at(rules: array[float], target: int) -> int | None:
    """Where ``target``'s value sits among a source's (target, value) pairs; None if absent."""
    targets = rules[::2]
    return 2 * targets.index(target) + 1 if target in targets else None


def _summed(triples: array[float]) -> tuple[np.ndarray, np.ndarray]:
    """(source, target, value) triples summed per (source, target): the pairs and sums."""
    if not triples:
        return np.empty((0, 2), dtype=np.int64), np.empty(0)
    table = np.frombuffer(triples, dtype=np.float64).reshape(-1, 3)
    pairs = table[:, :2].astype(np.int64)
    keys, inverse = np.unique(pairs[:, 0] << 32 | pairs[:, 1], return_inverse=True)
    sums = np.bincount(inverse, weights=table[:, 2], minlength=len(keys))
    return np.column_stack([keys >> 32, keys & 0xFFFFFFFF]), sums
