"""Baseline rankers for `pushrec evaluate`: time-decayed popularity, the user's recent items,
River's FunkMF as it ships, sequential rules and buying again. Each has ``learn_one(user, item,
kind, ts, rating)`` and ``recommend(user, n)`` like :class:`online_models.recommender.Recommender`.

>>> pop = PopularityRanker()
>>> for item in ["a", "b", "b"]:
...     pop.learn_one("u1", item, "click", ts=0.0)
>>> pop.learn_one("u2", "a", "purchase", ts=0.0)
>>> pop.recommend("u2", 2).items   # a is consumed by u2
['b']
>>> recent = RecentRanker()
>>> for item in ["a", "b", "a", "c"]:
...     recent.learn_one("u1", item, "view", ts=0.0)
>>> recent.recommend("u1", 3).items
['c', 'a', 'b']
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.recommender import CONSUMING_TYPES, DEFAULT_TYPE_WEIGHTS, TopN, is_positive
from online_models.topn import top_n


class _Consumed:
    """Items each user consumed (purchased or rated), as rows of a shared item index."""

    def __init__(self) -> None:
        self.items = ItemIndex()
        self._consumed: dict[str, set[int]] = {}

    def observe(self, user: str, item: str, kind: str) -> int:
        row = self.items.add(item)
        if kind in CONSUMING_TYPES:
            self._consumed.setdefault(user, set()).add(row)
        return row

    def of(self, user: str, size: int) -> list[int]:
        return [r for r in self._consumed.get(user, ()) if r < size]

    def rank(self, user: str, scores, n: int, model: str) -> TopN:  # type: ignore[no-untyped-def]
        rows, values = top_n(scores, n, exclude=self.of(user, scores.size))
        return TopN(user, [self.items.ids[r] for r in rows], [float(v) for v in values], model)


class PopularityRanker:
    """The same decayed popularity every user gets, minus what they consumed."""

    name = "popularity"

    def __init__(self, half_life_s: float = 86_400.0) -> None:
        self.popularity = Popularity(half_life_s)
        self.consumed = _Consumed()

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        row = self.consumed.observe(user, item, kind)
        if is_positive(kind, rating):
            self.popularity.learn_one(row, 1.0, ts)

    def recommend(self, user: str, n: int) -> TopN:
        return self.consumed.rank(user, self.popularity.scores(), n, self.name)


class RecentRanker:
    """The user's own most recent distinct items (not consumed ones), newest first."""

    name = "recent"

    def __init__(self, memory: int = 100) -> None:
        self.memory = memory
        self._recent: dict[str, OrderedDict[str, None]] = {}
        self._consumed: dict[str, set[str]] = {}

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        if kind in CONSUMING_TYPES:
            self._consumed.setdefault(user, set()).add(item)
        recent = self._recent.setdefault(user, OrderedDict())
        recent[item] = None
        recent.move_to_end(item)
        if len(recent) > self.memory:
            recent.popitem(last=False)

    def recommend(self, user: str, n: int) -> TopN:
        consumed = self._consumed.get(user, set())
        items = [i for i in reversed(self._recent.get(user, {})) if i not in consumed][:n]
        return TopN(user, items, [1.0 / (k + 1) for k in range(len(items))], self.name)


class SequentialRulesRanker:
    """Sequential rules as in session-rec (Ludewig et al.): each positive event on item i adds
    1/d to the rule j -> i for each of the user's ``window`` previous items j, d steps back; a
    user's list is the strongest rules from their last item (not it, nor a consumed item).

    >>> sr = SequentialRulesRanker()
    >>> for user, items in [("a", "xyz"), ("b", "xy"), ("c", "xz")]:
    ...     for item in items:
    ...         sr.learn_one(user, item, "click", ts=0.0)
    >>> sr.learn_one("d", "x", "click", ts=0.0)
    >>> sr.recommend("d", 2).items   # x -> y: 1 + 1, x -> z: 1/2 + 1
    ['y', 'z']
    """

    name = "sr"

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._rules: dict[str, dict[str, float]] = {}
        self._last: dict[str, list[str]] = {}
        self._consumed: dict[str, set[str]] = {}

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        if kind in CONSUMING_TYPES:
            self._consumed.setdefault(user, set()).add(item)
        if not is_positive(kind, rating):
            return
        last = self._last.setdefault(user, [])
        for distance, earlier in enumerate(reversed(last), start=1):
            if earlier != item:
                rules = self._rules.setdefault(earlier, {})
                rules[item] = rules.get(item, 0.0) + 1.0 / distance
        last.append(item)
        if len(last) > self.window:
            del last[0]

    def recommend(self, user: str, n: int) -> TopN:
        last = self._last.get(user)
        if not last:
            return TopN(user, [], [], self.name)
        consumed = self._consumed.get(user, set())
        rules = self._rules.get(last[-1], {})
        ranked = sorted(
            ((score, item) for item, score in rules.items() if item not in consumed and item != last[-1]),
            key=lambda pair: -pair[0],
        )[:n]
        return TopN(user, [item for _, item in ranked], [score for score, _ in ranked], self.name)


class RepeatRanker:
    """The user's most often bought items, most recent first among equals (P-TopFreq of the
    next-basket literature): buying again, with nothing excluded.

    >>> repeat = RepeatRanker()
    >>> for item in ["milk", "bread", "milk", "eggs"]:
    ...     repeat.learn_one("u", item, "purchase", ts=0.0)
    >>> repeat.recommend("u", 2).items
    ['milk', 'eggs']
    """

    name = "repeat"

    def __init__(self) -> None:
        self._bought: dict[str, dict[str, tuple[int, int]]] = {}  # user -> item -> (count, last)
        self._clock = 0

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        if kind != "purchase":
            return
        self._clock += 1
        bought = self._bought.setdefault(user, {})
        count, _ = bought.get(item, (0, 0))
        bought[item] = (count + 1, self._clock)

    def recommend(self, user: str, n: int) -> TopN:
        bought = self._bought.get(user, {})
        ranked = sorted(bought.items(), key=lambda pair: (-pair[1][0], -pair[1][1]))[:n]
        return TopN(user, [item for item, _ in ranked], [float(c) for _, (c, _) in ranked], self.name)


class FunkMFRanker:
    """River's FunkMF with its default settings, fed y=1 per event (what a naive setup does)."""

    name = "funkmf"

    def __init__(self, seed: int = 42) -> None:
        self.consumed = _Consumed()
        # FunkMF's defaults: 10 factors, SGD(0.1), squared loss, no L2.
        self.mf = ImplicitMF(
            n_factors=10, learning_rate=0.1, l2=0.0, seed=seed, items=self.consumed.items, loss="squared"
        )

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        self.consumed.observe(user, item, kind)
        if is_positive(kind, rating):
            self.mf.learn_one(user, item, 1.0)

    def recommend(self, user: str, n: int) -> TopN:
        scores = self.mf.score_many(user)
        if scores is None:
            return TopN(user, [], [], self.name)
        return self.consumed.rank(user, scores, n, self.name)


class ALSRanker:
    """The implicit library's ALS, refitted from scratch on everything so far every ``every`` events.

    The nightly-batch pattern: between refits the model is frozen, users it has not seen get the
    popularity list, items it has not seen cannot be recommended. Needs the ``eval`` extra.
    """

    name = "als"

    def __init__(
        self,
        every: int = 5_000,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        alpha: float = 10.0,
        seed: int = 42,
        half_life_s: float = 86_400.0,
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix

        self._new_model = lambda: AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            alpha=alpha,
            random_state=seed,
            num_threads=1,
        )
        self._csr = csr_matrix
        self.every = every
        self.consumed = _Consumed()
        self.popularity = Popularity(half_life_s)
        self._users: dict[str, int] = {}
        self._cells: dict[tuple[int, int], float] = {}
        self._seen = 0
        self._trained_users: dict[str, int] = {}
        self._user_factors = self._item_factors = np.zeros((0, factors), dtype=np.float32)

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        row = self.consumed.observe(user, item, kind)
        if is_positive(kind, rating):
            self.popularity.learn_one(row, 1.0, ts)
            weight = DEFAULT_TYPE_WEIGHTS.get(kind, 1.0)
            key = (self._users.setdefault(user, len(self._users)), row)
            self._cells[key] = self._cells.get(key, 0.0) + weight
        self._seen += 1
        if self._seen % self.every == 0 and self._cells:
            self._refit()

    def _refit(self) -> None:
        from threadpoolctl import threadpool_limits

        users, rows = zip(*self._cells, strict=True)
        matrix = self._csr(
            (np.fromiter(self._cells.values(), dtype=np.float32), (users, rows)),
            shape=(len(self._users), len(self.consumed.items)),
        )
        with threadpool_limits(1, "blas"):  # implicit's advice: BLAS threads fight its own
            model = self._new_model()
            model.fit(matrix, show_progress=False)
        self._user_factors, self._item_factors = model.user_factors, model.item_factors
        self._trained_users = dict(self._users)

    def recommend(self, user: str, n: int) -> TopN:
        index = self._trained_users.get(user)
        if index is None:
            return self.consumed.rank(user, self.popularity.scores(), n, PopularityRanker.name)
        return self.consumed.rank(user, self._item_factors @ self._user_factors[index], n, self.name)
