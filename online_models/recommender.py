"""The product recommender: online implicit MF blended with the user's own recent interest and
time-decayed popularity; popularity alone for cold users.

For a known user ``u``, every item ``i`` of the catalogue is scored

    (u + session_weight · mean of the last ``session_items`` item vectors) · v_i
    + popularity_weight · pop(i) / max pop
    + recent_weight · own(u, i)

``own(u, i)`` is the user's decayed, type-weighted interest in an item they touched (viewed,
clicked, put in the cart) and did not consume. The factors are learned one event at a time by
River (logistic loss, a confidence per event type, sampled negatives: uniform, popularity-aware or
a mix). The defaults come from the search in ``docs/quality.md``.

>>> rec = Recommender(n_factors=4, seed=0, top_n=2)
>>> rec.learn_one("u1", "apple", "purchase", ts=1.0)
>>> rec.learn_one("u2", "pear", "click", ts=2.0)
>>> rec.recommend("u1").items          # apple is consumed, so never recommended back
['pear']
>>> rec.recommend("stranger").model    # no history: the popularity list
'popularity'
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.topn import top_n

# Confidence of each event type as a positive signal (view < click < add_to_cart < purchase);
# a rating's weight is further scaled by rating / 5.
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
    last_ts: float = -math.inf
    consumed: set[int] = field(default_factory=set)
    # row -> (interest as of ``seen``, seen) for touched, unconsumed items; oldest first.
    interest: dict[int, tuple[float, float]] = field(default_factory=dict)
    # The last items the user touched (any type), for the session part of the query vector.
    session: deque[int] = field(default_factory=deque)


def is_positive(kind: str, rating: float | None) -> bool:
    """Whether an event says the user liked the item (ratings count from 4 up)."""
    if kind == "rating":
        return rating is not None and rating >= POSITIVE_RATING
    return True


class _RecentPositives:
    """A ring of recent positive item rows: a draw from it is a draw by recent popularity."""

    def __init__(self, size: int = 10_000) -> None:
        self._rows: list[int] = []
        self._size = size
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, row: int) -> None:
        if len(self._rows) < self._size:
            self._rows.append(row)
        else:
            self._rows[self._next] = row
            self._next = (self._next + 1) % self._size

    def draw(self, rng: random.Random) -> int:
        return self._rows[rng.randrange(len(self._rows))]

    def state(self) -> list[int]:
        return [self._next, *self._rows]

    def restore(self, state: list[int]) -> None:
        self._next, self._rows = state[0], list(state[1:])


class Recommender:
    """Learns from one event at a time; ranks the whole catalogue for one user on demand."""

    def __init__(
        self,
        n_factors: int = 16,
        learning_rate: float = 0.3,
        l2: float = 0.001,
        negatives: int = 1,
        popular_negatives: float = 0.5,
        seed: int = 42,
        top_n: int = 20,
        popularity_half_life_s: float = 86_400.0,
        popularity_weight: float = 2.0,
        session_weight: float = 3.0,
        session_items: int = 5,
        recent_weight: float = 100.0,
        recent_half_life_s: float = 86_400.0,
        recent_memory: int = 100,
        min_user_events: int = 1,
        type_weights: Mapping[str, float] = DEFAULT_TYPE_WEIGHTS,
    ) -> None:
        self.items = ItemIndex()
        self.mf = ImplicitMF(n_factors, learning_rate, l2, seed, items=self.items)
        self.popularity = Popularity(popularity_half_life_s)
        self.negatives = negatives
        self.popular_negatives = popular_negatives
        self.n = top_n
        self.popularity_weight = popularity_weight
        self.session_weight = session_weight
        self.session_items = session_items
        self.recent_weight = recent_weight
        self.recent_half_life_s = recent_half_life_s
        self.recent_memory = recent_memory
        self.min_user_events = min_user_events
        self.type_weights = dict(type_weights)
        self._rng = random.Random(seed)
        self._positives = _RecentPositives()
        self._users: dict[str, _UserState] = {}

    @property
    def n_users(self) -> int:
        return len(self._users)

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        """Update popularity, the user's history and (for positive events) the factors."""
        row = self.items.add(item)
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _UserState(session=deque(maxlen=self.session_items))
        state.events += 1
        state.last_ts = max(state.last_ts, ts)
        state.session.append(row)
        if kind in CONSUMING_TYPES:
            state.consumed.add(row)
            state.interest.pop(row, None)
        if not is_positive(kind, rating):
            return
        weight = self.type_weights.get(kind, 1.0)
        if kind == "rating" and rating is not None:
            weight *= rating / 5.0
        if row not in state.consumed:
            self._remember(state, row, weight, ts)
        self.popularity.learn_one(row, weight, ts)
        self.mf.learn_one(user, item, weight, self._sample_negatives())
        self._positives.add(row)

    def _remember(self, state: _UserState, row: int, weight: float, ts: float) -> None:
        previous = state.interest.pop(row, None)
        if previous is not None:
            weight += previous[0] * self._decay(ts - previous[1])
        state.interest[row] = (weight, ts)
        if len(state.interest) > self.recent_memory:
            del state.interest[next(iter(state.interest))]

    def _decay(self, age_s: float) -> float:
        return math.pow(2.0, -max(age_s, 0.0) / self.recent_half_life_s)

    def _sample_negatives(self) -> list[str]:
        if len(self.items) < 2:
            return []
        rng, ids, size = self._rng, self.items.ids, len(self.items)
        return [
            ids[self._positives.draw(rng)]
            if self._positives and rng.random() < self.popular_negatives
            else ids[rng.randrange(size)]
            for _ in range(self.negatives)
        ]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything learned, as JSON-able metadata and numpy arrays (see ``infra.checkpoint``)."""
        mf_meta, arrays = self.mf.state()
        pop_meta, pop_arrays = self.popularity.state()
        version, internal, gauss = self._rng.getstate()
        meta = {
            "items": self.items.ids,
            "mf": mf_meta,
            "popularity": pop_meta,
            "rng": [version, list(internal), gauss],
            "positives": self._positives.state(),
            "users": {
                user: [
                    u.events,
                    u.last_ts,
                    sorted(u.consumed),
                    [[row, value, seen] for row, (value, seen) in u.interest.items()],
                    list(u.session),
                ]
                for user, u in self._users.items()
            },
        }
        return meta, {**arrays, **pop_arrays}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` into this freshly built recommender (same settings)."""
        self.items.restore(meta["items"])
        self.mf.restore(meta["mf"], arrays)
        self.popularity.restore(meta["popularity"], arrays)
        version, internal, gauss = meta["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._positives.restore(meta["positives"])
        self._users = {
            user: _UserState(
                events,
                last_ts,
                set(consumed),
                {row: (value, seen) for row, value, seen in interest},
                deque(session, maxlen=self.session_items),
            )
            for user, (events, last_ts, consumed, interest, session) in meta["users"].items()
        }

    def forget(self, user: str) -> bool:
        """Erase the user's history and factors; False if the model never saw them."""
        known = self._users.pop(user, None) is not None
        return self.mf.forget(user) or known

    def recommend(self, user: str, n: int | None = None) -> TopN:
        """The user's top-``n``; never an item they consumed. Read-only: no state changes."""
        n = self.n if n is None else n
        state = self._users.get(user)
        scores = None
        if state is not None and state.events >= self.min_user_events:
            scores = self._blend(user, state)
        model = MODEL_NAME
        if scores is None:
            scores, model = self.popularity.scores(), POPULARITY
        consumed = state.consumed if state is not None else ()
        # ``scores`` is a fresh array either way, so top_n may mask exclusions in place.
        rows, values = top_n(scores, n, exclude=[r for r in consumed if r < scores.size], in_place=True)
        ids = self.items.ids
        return TopN(user, [ids[r] for r in rows], [float(v) for v in values], model)

    def _blend(self, user: str, state: _UserState) -> np.ndarray | None:
        query = self.mf.user_vector(user)
        if query is None:
            return None
        matrix = self.mf.item_matrix()
        if self.session_weight and state.session:
            query += (self.session_weight / len(state.session)) * matrix[list(state.session)].sum(axis=0)
        scores = matrix @ query
        if self.popularity_weight:
            self.popularity.add_normalised(scores, self.popularity_weight)
        if self.recent_weight and state.interest:
            rows = np.fromiter(state.interest, dtype=np.int64, count=len(state.interest))
            value_seen = np.array(list(state.interest.values()))
            age = np.maximum(state.last_ts - value_seen[:, 1], 0.0)
            own = value_seen[:, 0] * np.exp2(-age / self.recent_half_life_s)
            scores[rows] += (self.recent_weight * own).astype(np.float32)
        return scores
