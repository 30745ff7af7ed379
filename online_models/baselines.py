"""Baseline rankers for `pushrec evaluate`: time-decayed popularity, the user's recent items, and
River's FunkMF as it ships. Each has ``learn_one(user, item, kind, ts, rating)`` and
``recommend(user, n)`` like :class:`online_models.recommender.Recommender`.

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

from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.recommender import CONSUMING_TYPES, TopN, is_positive
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
