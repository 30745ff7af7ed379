"""The product recommender: online implicit MF blended with the user's own recent interest and
time-decayed popularity; popularity alone for cold users.

For a known user ``u``, every item ``i`` of the catalogue is scored

    (u + session_weight · mean of the last ``session_items`` item vectors) · v_i
    + popularity_weight · pop(i) / max pop
    + recent_weight · own(u, i)

``own(u, i)`` is the user's decayed, type-weighted interest in an item they touched (viewed,
clicked, put in the cart) and did not consume. With a catalogue (:meth:`Recommender.add_items`),
items nobody touched yet get factors predicted from their text and a learned text-match term
(``online_models.content``), users get interest segments (``online_models.segments``) and lists
get reasons (``online_models.explain``). From ``ann_min_items`` items on, candidates come from an
HNSW index (``online_models.ann``) instead of the whole catalogue. The factors are learned one
event at a time by River (logistic loss, a confidence per event type, sampled negatives: uniform,
popularity-aware or a mix). The defaults come from the search in ``docs/quality.md``.

>>> rec = Recommender(n_factors=4, seed=0, top_n=2)
>>> rec.learn_one("u1", "apple", "purchase", ts=1.0)
>>> rec.learn_one("u2", "pear", "click", ts=2.0)
>>> rec.recommend("u1").items          # apple is consumed, so never recommended back
['pear']
>>> rec.recommend("stranger").model    # no history: the popularity list
'popularity'
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from types import MappingProxyType
from typing import Any

import numpy as np

from online_models import ann
from online_models.content import Catalogue, make_encoder
from online_models.explain import POPULAR_REASON, History, reasons
from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.segments import InterestSegments
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
# Candidates the approximate path scores exactly beside the graph's: the popularity head (popularity
# only grows for touched rows, which are pending, so the head of the last flush plus the pending
# rows always contain today's head).
_POPULAR_HEAD = 256

log = logging.getLogger(__name__)

# Step of the online update of ``content_weight`` (from the runs in docs/quality.md: 0.1 learned
# too slowly to help the shop with new arrivals, 3 overshot on the back catalogue).
_CONTENT_WEIGHT_STEP = 1.0


@dataclass(frozen=True, slots=True)
class TopN:
    """One user's ranked list and the model that made it."""

    user_id: str
    items: list[str]
    scores: list[float]
    model: str
    reasons: list[str] = field(default_factory=list)  # one short "why" per item (or none)
    tags: list[str] = field(default_factory=list)  # the user's interest segment's name
    segment: int | None = None


@dataclass
class _UserState:
    events: int = 0
    last_ts: float = -math.inf
    consumed: set[int] = field(default_factory=set)
    # row -> (interest as of ``seen``, seen) for touched, unconsumed items; oldest first.
    interest: dict[int, tuple[float, float]] = field(default_factory=dict)
    # The last items the user touched (any type), for the session part of the query vector.
    session: deque[int] = field(default_factory=deque)
    # What the user last did to each session item (event type), for explanations.
    kinds: dict[int, str] = field(default_factory=dict)


def _rng_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as JSON (for checkpoints)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


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
        ann_min_items: int = 100_000,
        ann_expansion: int = 128,
        ann_pending_max: int = 4096,
        ann_background: bool = True,
        content_encoder: str = "hashed",
        content_dim: int = 256,
        content_learning_rate: float = 0.01,
        content_refresh_every: int = 1000,
        content_weight: float = 0.0,
        n_segments: int = 8,
    ) -> None:
        """``ann_*``: from ``ann_min_items`` catalogue rows on (0 = never) lists come from an HNSW
        index (the ``[ann]`` extra) instead of scoring every item; see ``online_models.ann``. With
        ``ann_background`` the index is built in a thread and lists stay exact until it is ready.
        ``content_*``: items announced by :meth:`add_items` are embedded by ``content_encoder``
        ("hashed", "minilm" or "off"); the factors of items nobody touched yet are predicted from
        that (re-predicted every ``content_refresh_every`` positive events), and they also score
        ``content_weight`` x the cosine of their text to the user's last items' (a starting value:
        the weight is learned online, see :meth:`_tune_content_weight`); see
        ``online_models.content``."""
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
        self.ann_min_items = ann_min_items
        self.ann_expansion = ann_expansion
        self.ann_pending_max = ann_pending_max
        self._ann: ann.FactorIndex | None = None
        self.ann_background = ann_background
        # A build in progress: (thread, the index it fills, start time), and rows changed meanwhile.
        self._ann_build: tuple[threading.Thread, ann.FactorIndex, float] | None = None
        self._changed_while_building: set[int] = set()
        self._popular_head = np.empty(0, dtype=np.int64)
        self.content_encoder = content_encoder
        self.content_dim = content_dim
        self.content_learning_rate = content_learning_rate
        self.content_refresh_every = content_refresh_every
        self.content_weight = content_weight
        self._content_rng = random.Random(seed + 1)
        self.catalogue: Catalogue | None = None  # made when the first items are announced
        self.segments = InterestSegments(n_segments, seed)  # learned once there is a catalogue
        # Rows seen in the event stream, in order of first sight; None = every row (no catalogue).
        self._stream_rows: list[int] | None = None
        self._in_stream: set[int] = set()
        self._positives_since_refresh = 0

    @property
    def approximate_index(self) -> ann.FactorIndex | None:
        """The HNSW index lists come from, once built (see ``ann_min_items``)."""
        return self._ann

    @property
    def n_users(self) -> int:
        return len(self._users)

    @property
    def refused_updates(self) -> int:
        """Factor updates undone because they would have left a factor non-finite or exploding."""
        return self.mf.refused

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        """Update popularity, the user's history and (for positive events) the factors."""
        if not math.isfinite(ts):
            raise ValueError(f"event time {ts!r} is not finite")
        row = self.items.add(item)
        if self._stream_rows is not None and row not in self._in_stream:
            self._in_stream.add(row)
            self._stream_rows.append(row)
        state = self._users.get(user)
        if state is not None and self.catalogue is not None and is_positive(kind, rating):
            self._tune_content_weight(user, state, row)
        if state is None:
            state = self._users[user] = _UserState(session=deque(maxlen=self.session_items))
        state.events += 1
        state.last_ts = max(state.last_ts, ts)
        state.session.append(row)
        state.kinds[row] = kind
        if len(state.kinds) > 2 * self.session_items:
            state.kinds = {r: state.kinds[r] for r in state.session if r in state.kinds}
        if kind in CONSUMING_TYPES:
            state.consumed.add(row)
            state.interest.pop(row, None)
        if not is_positive(kind, rating):
            return
        weight = self.type_weights.get(kind, 1.0)
        if kind == "rating" and rating is not None:  # 0-5 stars (the codec refuses the rest)
            weight *= min(max(rating, 0.0), 5.0) / 5.0
        if row not in state.consumed:
            self._remember(state, row, weight, ts)
        self.popularity.learn_one(row, weight, ts)
        negatives = self._sample_negatives()
        if self.catalogue is not None:
            self._warm_start(item, negatives)
        if not self.mf.learn_one(user, item, weight, negatives):
            log.debug("update of %r by %r refused: factors would be non-finite or exploding", user, item)
            return
        self._positives.add(row)
        if self._ann is not None:
            self._ann.changed([row, *map(self.items.row, negatives)])
        elif self._ann_build is not None:
            self._changed_while_building.update([row, *map(self.items.row, negatives)])
        if self.catalogue is not None:
            self.catalogue.learn_one(row, self.mf.item_matrix()[row])
            self.segments.learn_one(self.mf.user_vector(user), self.catalogue.terms(row))  # type: ignore[arg-type]
            self._positives_since_refresh += 1
            if self._positives_since_refresh >= self.content_refresh_every:
                self._predict_cold()

    # --- item content --------------------------------------------------------------------------

    def add_items(
        self, items: Sequence[str], titles: Sequence[str | None], categories: Sequence[str | None]
    ) -> int:
        """Announce catalogue items (new, or with changed text): embed their content in one batch;
        an item nobody has touched yet gets factors predicted from it. Returns how many were embedded."""
        if self.content_encoder == "off":
            return 0
        if self.catalogue is None:
            self.catalogue = self._new_catalogue()
            self._set_stream_rows(list(range(len(self.items))))  # every row so far came from events
        rows = [self.items.add(item) for item in items]
        embedded = self.catalogue.add(rows, titles, categories)
        cold = np.array([row for row in embedded if self.items.ids[row] not in self.mf], dtype=np.int64)
        self.catalogue.mark_cold(cold.tolist())
        if cold.size:  # the others keep theirs until the next refresh (see _predict_cold)
            self.mf.set_rows(cold, self.catalogue.predict(cold))
        return len(embedded)

    def _new_catalogue(self) -> Catalogue:
        encoder = make_encoder(self.content_encoder, self.content_dim)
        return Catalogue(encoder, self.mf.n_factors, self.content_learning_rate)

    def _set_stream_rows(self, rows: list[int] | None) -> None:
        self._stream_rows = rows
        self._in_stream = set(rows or ())

    def _tune_content_weight(self, user: str, state: _UserState, target: int) -> None:
        """One pairwise (BPR) step on ``content_weight`` before learning a positive event: the
        target against a random item, both scored as :meth:`recommend` would. Text similarity earns
        weight where untouched items do get picked (a shop's new arrivals) and loses it where it
        only pushes ignored items up (a back catalogue nobody rated yet)."""
        assert self.catalogue is not None
        query = self._query(user, state)
        if query is None or len(self.items) < 2:
            return
        other = self._content_rng.randrange(len(self.items))
        if other == target or other in state.consumed:
            return
        rows = np.array(sorted((target, other)), dtype=np.int64)
        scores = self._blend(query, state, rows)
        match = np.zeros(2, dtype=np.float32)
        self._add_content_match(match, state, rows, weight=1.0)
        t = int(rows[1] == target)
        margin = float(scores[t] - scores[1 - t])
        step = _CONTENT_WEIGHT_STEP * (match[t] - match[1 - t]) / (1.0 + math.exp(min(margin, 50.0)))
        self.content_weight = max(0.0, self.content_weight + float(step))

    def _warm_start(self, item: str, negatives: list[str]) -> None:
        """A cold item about to be learned starts from its predicted factors, not random ones."""
        assert self.catalogue is not None
        for name in (item, *negatives):
            row = self.items.row(name)
            if self.catalogue.warm(row):
                self.mf.seed_items([name], self.mf.item_matrix()[row : row + 1].copy())

    def _predict_cold(self) -> None:
        """Write the projection's current prediction into every cold item's row."""
        assert self.catalogue is not None
        self._positives_since_refresh = 0
        rows = self.catalogue.cold_rows()
        if not rows.size:
            return
        # Not re-indexed: the approximate index keeps each untouched item's prediction from when
        # it was indexed (re-inserting a whole catalogue every refresh would cost minutes); the
        # candidates it returns are scored with the fresh prediction.
        self.mf.set_rows(rows, self.catalogue.predict(rows))

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
        """Negatives come from items seen in the stream (all rows unless a catalogue announced
        more): an item nobody touched is not evidence of anything, and keeps its cold start."""
        stream = self._stream_rows
        size = len(self.items) if stream is None else len(stream)
        if size < 2:
            return []
        rng, ids = self._rng, self.items.ids
        return [
            ids[self._positives.draw(rng)]
            if self._positives and rng.random() < self.popular_negatives
            else ids[rng.randrange(size) if stream is None else stream[rng.randrange(size)]]
            for _ in range(self.negatives)
        ]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything learned, as JSON-able metadata and numpy arrays (see ``infra.checkpoint``)."""
        mf_meta, arrays = self.mf.state()
        pop_meta, pop_arrays = self.popularity.state()
        meta: dict[str, Any] = {
            "items": self.items.ids,
            "mf": mf_meta,
            "popularity": pop_meta,
            "rng": _rng_state(self._rng),
            "positives": self._positives.state(),
            "users": {
                user: [
                    u.events,
                    u.last_ts,
                    sorted(u.consumed),
                    [[row, value, seen] for row, (value, seen) in u.interest.items()],
                    list(u.session),
                    [[row, kind] for row, kind in u.kinds.items()],
                ]
                for user, u in self._users.items()
            },
        }
        if self.catalogue is not None:
            meta["segments"] = self.segments.state()
            meta["content_weight"] = self.content_weight
            meta["content_rng"] = _rng_state(self._content_rng)
            content_meta, content_arrays = self.catalogue.state()
            meta["content"] = content_meta
            cold = np.array(content_meta["cold"], dtype=np.int64)
            meta["content_since_refresh"] = self._positives_since_refresh
            meta["stream_rows"] = self._stream_rows
            arrays = {**arrays, **content_arrays, "content_cold_factors": self.mf.item_matrix()[cold].copy()}
        return meta, {**arrays, **pop_arrays}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` into this freshly built recommender (same settings)."""
        self.items.restore(meta["items"])
        self.mf.restore(meta["mf"], arrays)
        self.popularity.restore(meta["popularity"], arrays)
        _set_rng_state(self._rng, meta["rng"])
        self._positives.restore(meta["positives"])
        self._ann = self._ann_build = None  # rebuilt from the restored factors on the next list
        self.catalogue = None
        self._set_stream_rows(None)
        if "content" in meta:
            self.catalogue = self._new_catalogue()
            self.catalogue.restore(meta["content"], arrays)
            cold = np.array(meta["content"]["cold"], dtype=np.int64)
            self.mf.set_rows(cold, arrays["content_cold_factors"])
            self._positives_since_refresh = meta["content_since_refresh"]
            self._set_stream_rows(list(meta["stream_rows"]))
            self.segments.restore(meta["segments"])
            self.content_weight = meta["content_weight"]
            _set_rng_state(self._content_rng, meta["content_rng"])
        self._users = {
            user: _UserState(
                events,
                last_ts,
                set(consumed),
                {row: (value, seen) for row, value, seen in interest},
                deque(session, maxlen=self.session_items),
                {row: kind for row, kind in kinds},
            )
            for user, (events, last_ts, consumed, interest, session, kinds) in meta["users"].items()
        }

    def forget(self, user: str) -> bool:
        """Erase the user's history and factors; False if the model never saw them."""
        known = self._users.pop(user, None) is not None
        return self.mf.forget(user) or known

    def recommend(self, user: str, n: int | None = None, exact: bool = False, explain: bool = False) -> TopN:
        """The user's top-``n``; never an item they consumed. Leaves what was learned unchanged
        (it may bring the approximate index up to date). ``exact=True`` scores every item even
        where the approximate index would be used (to measure its recall); ``explain=True`` adds
        a reason per item and the user's interest segment (what the stored lists carry)."""
        n = self.n if n is None else n
        state = self._users.get(user)
        query = None
        if state is not None and state.events >= self.min_user_events:
            query = self._query(user, state)
        if query is None:
            scores = self.popularity.scores()
            consumed = state.consumed if state is not None else ()
            rows, values = top_n(scores, n, exclude=[r for r in consumed if r < scores.size], in_place=True)
            return self._top(user, rows, values, POPULARITY, state, None, explain)
        assert state is not None
        index = None if exact else self._index()
        if index is None:
            scores = self._blend(query, state)
            # ``scores`` is a fresh array, so top_n may mask exclusions in place.
            rows, values = top_n(scores, n, exclude=state.consumed, in_place=True)
            return self._top(user, rows, values, MODEL_NAME, state, query, explain)
        found, pending = index.candidates(query, k=2 * n + len(state.consumed))
        interest = np.fromiter(state.interest, dtype=np.int64, count=len(state.interest))
        candidates = np.sort(np.concatenate([found, pending, interest, self._popular_head]))
        candidates = candidates[np.concatenate(([True], candidates[1:] != candidates[:-1]))]
        if state.consumed:
            consumed_rows = np.fromiter(state.consumed, dtype=np.int64, count=len(state.consumed))
            candidates = candidates[~np.isin(candidates, consumed_rows, assume_unique=True)]
        picked, values = top_n(self._blend(query, state, candidates), n, in_place=True)
        return self._top(user, candidates[picked], values, MODEL_NAME, state, query, explain)

    def user_query(self, user: str) -> np.ndarray | None:
        """The vector a known user's items are scored against (None for a user without factors)."""
        state = self._users.get(user)
        return None if state is None else self._query(user, state)

    def _top(
        self,
        user: str,
        rows: np.ndarray,
        values: np.ndarray,
        model: str,
        state: _UserState | None,
        query: np.ndarray | None,
        explain: bool,
    ) -> TopN:
        ids = self.items.ids
        if not explain:
            return TopN(user, [ids[r] for r in rows.tolist()], values.tolist(), model)
        segment, tags = None, []
        taste = self.mf.user_vector(user) if query is not None and self.catalogue is not None else None
        if taste is not None:  # the vector segments learn from (not the session-shifted query)
            segment = self.segments.predict_one(taste)
            tags = self.segments.tags(segment)
        return TopN(
            user,
            [ids[r] for r in rows.tolist()],
            values.tolist(),
            model,
            self._explain(rows, state if model == MODEL_NAME else None),
            tags,
            segment,
        )

    def _explain(self, rows: np.ndarray, state: _UserState | None) -> list[str]:
        if state is None or not state.session:
            return [POPULAR_REASON] * len(rows)
        kinds = state.kinds
        history = History(
            rows=np.array(list(dict.fromkeys(reversed(state.session))), dtype=np.int64),
            kinds=kinds,
            own={row: kinds.get(row, "view") for row in rows.tolist() if row in state.interest},
        )
        catalogue = self.catalogue
        text = None if catalogue is None else catalogue.vectors
        cold = np.zeros(len(rows), dtype=bool) if catalogue is None else np.isin(rows, catalogue.cold_rows())
        return reasons(rows, history, self.mf.item_matrix(), text, cold, self._title)

    def _title(self, row: int) -> str:
        title = self.catalogue.titles.get(row) if self.catalogue is not None else None
        return title or self.items.ids[row]

    def _query(self, user: str, state: _UserState) -> np.ndarray | None:
        """The user's vector plus the session part, or None for a user without factors."""
        query = self.mf.user_vector(user)
        if query is not None and self.session_weight and state.session:
            matrix = self.mf.item_matrix()
            query += (self.session_weight / len(state.session)) * matrix[list(state.session)].sum(axis=0)
        return query

    def _blend(self, query: np.ndarray, state: _UserState, rows: np.ndarray | None = None) -> np.ndarray:
        """Blended scores of ``rows`` (sorted, unique; None = every item), in that order."""
        matrix = self.mf.item_matrix()
        scores = matrix @ query if rows is None else matrix[rows] @ query
        if self.popularity_weight:
            self.popularity.add_normalised(scores, self.popularity_weight, rows)
        if self.recent_weight and state.interest:
            count = len(state.interest)
            touched = np.fromiter(state.interest, dtype=np.int64, count=count)
            # (weight, ts) pairs, flattened: 3x cheaper than np.array() of a list of tuples.
            value_seen = np.fromiter(
                chain.from_iterable(state.interest.values()), dtype=np.float64, count=2 * count
            ).reshape(count, 2)
            age = np.maximum(state.last_ts - value_seen[:, 1], 0.0)
            own = self.recent_weight * value_seen[:, 0] * np.exp2(-age / self.recent_half_life_s)
            if rows is not None:  # where each touched row sits among ``rows``, if it is there
                at = np.minimum(np.searchsorted(rows, touched), len(rows) - 1)
                present = rows[at] == touched
                touched, own = at[present], own[present]
            scores[touched] += own.astype(np.float32)
        if self.catalogue is not None and self.content_weight:
            self._add_content_match(scores, state, rows)
        return scores

    def _add_content_match(
        self, scores: np.ndarray, state: _UserState, rows: np.ndarray | None, weight: float | None = None
    ) -> None:
        """Items nobody touched yet also score by how close their text is to the user's last items'
        (cosine of content embeddings, times ``content_weight``)."""
        assert self.catalogue is not None
        cold = self.catalogue.cold_rows()
        if not cold.size:
            return
        profile = self.catalogue.profile(state.session)
        if profile is None:
            return
        weight = self.content_weight if weight is None else weight
        embeddings = self.catalogue.embeddings
        if rows is None:  # one contiguous product beats gathering the cold rows first
            scores[cold] += np.float32(weight) * (embeddings[: scores.size] @ profile)[cold]
        else:
            where = np.flatnonzero(np.isin(rows, cold, assume_unique=True))
            scores[where] += np.float32(weight) * (embeddings[rows[where]] @ profile)

    def _index(self) -> ann.FactorIndex | None:
        """The approximate index, brought up to date; None below ``ann_min_items`` rows, without
        the ``[ann]`` extra (logged once), or while it is being built: the first need starts the
        build (in a background thread with ``ann_background``: usearch releases the GIL, so the
        event loop and its heartbeats go on; lists are scored exactly meanwhile)."""
        size = len(self.items)
        if not self.ann_min_items or size < self.ann_min_items:
            return None
        if self._ann is None and not self._adopt_built_index():
            return None
        assert self._ann is not None
        if size > self._ann.indexed:
            self._ann.changed(range(self._ann.indexed, size))
        if self._ann.due():
            self._ann.flush(self.mf.item_matrix())
            self._popular_head = self._popularity_head()
        return self._ann

    def build_index(self) -> ann.FactorIndex | None:
        """Build the approximate index now and wait for it (None when it does not apply)."""
        if len(self.items) >= self.ann_min_items > 0 and self._ann is None:
            self._adopt_built_index()
            if self._ann_build is not None:
                self._ann_build[0].join()
        return self._index()

    def _adopt_built_index(self) -> bool:
        """Start the build if none runs; adopt the index once built. True when it is in use."""
        if self._ann_build is None:
            if not ann.available():
                log.warning(
                    "catalogue of %d items, but usearch is not installed: scoring every item "
                    "(pip install 'pushrec[ann]')",
                    len(self.items),
                )
                self.ann_min_items = 0
                return False
            snapshot = self.mf.item_matrix().copy()
            index = ann.FactorIndex(
                self.mf.n_factors, expansion=self.ann_expansion, pending_max=self.ann_pending_max
            )
            log.info("building the approximate index over %d items", len(snapshot))
            thread = threading.Thread(
                target=index.build, args=(snapshot,), name="pushrec-ann-build", daemon=True
            )
            self._ann_build = (thread, index, time.monotonic())
            self._changed_while_building = set()
            if self.ann_background:
                thread.start()
                return False
            thread.run()
        thread, index, started = self._ann_build
        if thread.is_alive():
            return False
        self._ann_build = None
        index.changed(self._changed_while_building)  # moved while their old factors were indexed
        self._changed_while_building = set()
        self._ann = index
        self._popular_head = self._popularity_head()
        log.info("approximate index of %d items ready after %.1fs", len(index), time.monotonic() - started)
        return True

    def _popularity_head(self) -> np.ndarray:
        counts = self.popularity.scores()
        k = min(_POPULAR_HEAD, counts.size)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        return np.sort(np.argpartition(counts, counts.size - k)[counts.size - k :])
