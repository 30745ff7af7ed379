"""The product recommender: online implicit MF for known users, popularity for cold ones.

>>> rec = Recommender(n_factors=4, seed=0, top_n=2)
>>> rec.learn_one("u1", "apple", "purchase", ts=1.0)
>>> rec.learn_one("u2", "pear", "click", ts=2.0)
>>> rec.recommend("u1").items          # apple is consumed, so never recommended back
['pear']
>>> rec.recommend("stranger").model    # no history: the popularity list
'popularity'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.topn import top_n

# Confidence of each event type as a positive signal (view < click < add_to_cart < purchase).
DEFAULT_TYPE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"view": 0.25, "click": 0.5, "add_to_cart": 0.75, "purchase": 1.0, "rating": 1.0}
)
# Events after which the item is "consumed" and never recommended to that user again.
CONSUMING_TYPES = frozenset({"purchase", "rating"})
POSITIVE_RATING = 4.0

MODEL_NAME = "pushrec"
POPULARITY = "popularity"


@dataclass(frozen=True, slots=True)
class TopN:
    """One user's ranked list and the model that made it."""

    user_id: str
    items: list[str]
    scores: list[float]
    model: str


@dataclass
class _UserState:
    events: int = 0
    consumed: set[int] = field(default_factory=set)


def is_positive(kind: str, rating: float | None) -> bool:
    """Whether an event says the user liked the item (ratings count from 4 up)."""
    if kind == "rating":
        return rating is not None and rating >= POSITIVE_RATING
    return True


class Recommender:
    """Learns from one event at a time; ranks the whole catalogue for one user on demand."""

    def __init__(
        self,
        n_factors: int = 32,
        learning_rate: float = 0.05,
        l2: float = 0.001,
        negatives: int = 4,
        seed: int = 42,
        top_n: int = 20,
        popularity_half_life_s: float = 86_400.0,
        min_user_events: int = 1,
        type_weights: Mapping[str, float] = DEFAULT_TYPE_WEIGHTS,
    ) -> None:
        self.items = ItemIndex()
        self.mf = ImplicitMF(n_factors, learning_rate, l2, seed, items=self.items)
        self.popularity = Popularity(popularity_half_life_s)
        self.negatives = negatives
        self.n = top_n
        self.min_user_events = min_user_events
        self.type_weights = dict(type_weights)
        self._rng = np.random.default_rng(seed)
        self._users: dict[str, _UserState] = {}

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        """Update popularity, the user's history and (for positive events) the factors."""
        row = self.items.add(item)
        state = self._users.setdefault(user, _UserState())
        state.events += 1
        if kind in CONSUMING_TYPES:
            state.consumed.add(row)
        if not is_positive(kind, rating):
            return
        weight = self.type_weights.get(kind, 1.0)
        if kind == "rating" and rating is not None:
            weight *= rating / 5.0
        self.popularity.learn_one(row, weight, ts)
        self.mf.learn_one(user, item, weight, self._sample_negatives())

    def _sample_negatives(self) -> list[str]:
        if self.negatives == 0 or len(self.items) < 2:
            return []
        rows = self._rng.integers(0, len(self.items), size=self.negatives)
        return [self.items.ids[r] for r in rows]

    def recommend(self, user: str, n: int | None = None) -> TopN:
        """The user's top-``n``; never an item they consumed. Read-only: no state changes."""
        n = self.n if n is None else n
        state = self._users.get(user)
        consumed = state.consumed if state is not None else ()
        scores = None
        if state is not None and state.events >= self.min_user_events:
            scores = self.mf.score_many(user)
        model = MODEL_NAME
        if scores is None:
            scores, model = self.popularity.scores(), POPULARITY
        rows, values = top_n(scores, n, exclude=[r for r in consumed if r < scores.size])
        ids = self.items.ids
        return TopN(user, [ids[r] for r in rows], [float(v) for v in values], model)
