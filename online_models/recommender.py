"""The product recommender: online implicit MF blended with the user's own recent interest and
time-decayed popularity; popularity alone for cold users.

For a known user ``u``, every item ``i`` of the catalogue is scored

    (u + session_weight · mean of the last ``session_items`` item vectors) · v_i
    + popularity_weight · pop(i) / max pop
    + recent_weight · own(u, i)
    + covisit_weight · rules(last items -> i)
    + rebuy_weight · again(u, i)

``own(u, i)`` is the user's decayed, type-weighted interest in an item they touched (viewed,
clicked, put in the cart) and did not consume. ``rules`` are the items shoppers engaged with
after the user's last items (``online_models.covisit``, scaled to at most 1); ``again`` is, for
an item the user bought, their chance of buying it again: of their n purchases of it, the n - 1
that repeated one, with the item's repeat share among all shoppers (``online_models.rebuy``)
counted as one more, (n - 1 + share) / n. A consumed item is never listed, but for those whose
chance is at least ``rebuy_min_share``.

With a catalogue (:meth:`Recommender.add_items`), items nobody touched yet get factors
predicted from their text and a learned text-match term
(``online_models.item_content``), users get interest segments and lists get reasons
(``online_models.explain``). From ``ann_min_items`` items on, candidates come from an HNSW index
(``online_models.candidates``) instead of the whole catalogue. The factors are learned one event
at a time by River (logistic loss, a confidence per event type, sampled negatives from
``online_models.sampling``). The defaults come from the search in ``docs/quality.md``.

>>> rec = Recommender(n_factors=4, seed=0, top_n=2)
>>> rec.learn_one("u1", "apple", "purchase", ts=1.0)
>>> rec.learn_one("u2", "pear", "click", ts=2.0)
>>> rec.recommend("u1").items          # apple is consumed (and nobody buys it twice)
['pear']
>>> rec.recommend("stranger").model    # no history: the popularity list
'popularity'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from types import MappingProxyType
from typing import Any

import numpy as np

from online_models import ann
from online_models.candidates import Candidates
from online_models.content import Catalogue
from online_models.covisit import CoVisitation
from online_models.explain import POPULAR_REASON, reasons
from online_models.item_content import ItemContent
from online_models.mf import ImplicitMF, ItemIndex
from online_models.popularity import Popularity
from online_models.rebuy import BuyingAgain
from online_models.related import Related, add_at, locate, related
from online_models.sampling import NegativeSampler
from online_models.topn import top_n
from online_models.user_state import UserState
from online_models.user_table import UserTable

# Confidence of each event type as a positive signal (view < click < add_to_cart < purchase);
# a rating's weight is further scaled by rating / 5; an opened push counts like a click.
DEFAULT_TYPE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"view": 0.25, "click": 0.5, "add_to_cart": 0.75, "purchase": 1.0, "rating": 1.0, "push_open": 0.5}
)
# A shopper's answers to a push: an opened one is a positive (its type weight), a dismissed one
# lowers the item for them. Neither is a visit to the shop.
OPEN, DISMISS = "push_open", "push_dismiss"
PUSH_ANSWERS = frozenset({OPEN, DISMISS})
# Events after which the item is "consumed" and never recommended to that user again.
CONSUMING_TYPES = frozenset({"purchase", "rating"})
POSITIVE_RATING = 4.0

MODEL_NAME = "pushrec"
POPULARITY = "popularity"

log = logging.getLogger(__name__)
# A round of this many users or more scores every item in one matrix product per up to 32 of
# them (below 8, BLAS's packing of the item matrix costs more than it saves), while their scores
# fit in _ONE_PRODUCT_BYTES: the exact path also runs over a million items while the index is
# being built, or without the [ann] extra.
_ONE_PRODUCT_FROM, _ONE_PRODUCT_MAX, _ONE_PRODUCT_BYTES = 8, 32, 16 * 2**20


def _together(users: int, items: int) -> int:
    """How many of a round's ``users`` share a product over ``items`` (even chunks); 0: each on
    their own.

    >>> _together(7, 35_000), _together(33, 35_000), _together(100, 100_000), _together(100, 1_000_000)
    (0, 17, 25, 0)
    """
    most = min(_ONE_PRODUCT_MAX, _ONE_PRODUCT_BYTES // (4 * max(items, 1)))
    if users < _ONE_PRODUCT_FROM or most < _ONE_PRODUCT_FROM:
        return 0
    return math.ceil(users / math.ceil(users / most))


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
    away: bool = False  # ranked for a shopper who has left (see ``Recommender.visit_gap_s``)


@dataclass(frozen=True, slots=True)
class _Shared:
    """The rows every list of a batch scores on the approximate path (thousands at a million
    items), with their factors gathered once for the batch and the popularity part of their blend."""

    rows: np.ndarray
    factors: np.ndarray
    popularity: np.ndarray


def is_positive(kind: str, rating: float | None) -> bool:
    """Whether an event says the user liked the item (ratings count from 4 up; a dismissed push no)."""
    if kind == "rating":
        return rating is not None and rating >= POSITIVE_RATING
    return kind != DISMISS


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
        covisit_weight: float = 20.0,
        covisit_window: int = 5,
        covisit_neighbours: int = 30,
        covisit_half_life_s: float = 30 * 86_400.0,
        rebuy_weight: float = 50.0,
        rebuy_min_share: float = 0.05,
        visit_gap_s: float = 1800.0,
        covisit_away_share: float = 0.25,
    ) -> None:
        """``ann_*``: see :class:`online_models.candidates.Candidates`; ``content_*`` and
        ``n_segments``: see :class:`online_models.item_content.ItemContent`.

        A shopper without an event for ``visit_gap_s`` of stream time (:attr:`clock`) has left:
        their list is the one a push carries and their next visit opens, so the rules from
        their last items weigh ``covisit_away_share`` of ``covisit_weight`` in it (docs/quality.md,
        "The list of a shopper who has left")."""
        self.items = ItemIndex()
        self.mf = ImplicitMF(n_factors, learning_rate, l2, seed, items=self.items)
        self.popularity = Popularity(popularity_half_life_s)
        self.negatives = NegativeSampler(negatives, popular_negatives, seed)
        self.n = top_n
        self.popularity_weight = popularity_weight
        self.session_weight = session_weight
        self.session_items = session_items
        self.recent_weight = recent_weight
        self.recent_half_life_s = recent_half_life_s
        self.recent_memory = recent_memory
        self.min_user_events = min_user_events
        self.type_weights = dict(type_weights)
        self.covisit_weight = covisit_weight
        self.covisit = CoVisitation(covisit_window, covisit_neighbours, covisit_half_life_s)
        self.rebuy_weight = rebuy_weight
        self.visit_gap_s = visit_gap_s
        self.covisit_away_share = covisit_away_share
        self.clock = -math.inf  # the stream's time: the latest event time learned
        self.rebuy = BuyingAgain(rebuy_min_share, lambda row: self.content.category(row))
        self._last_related: tuple[tuple[bytes, bytes, int, int], Related] | None = None
        self.users = UserTable(self.mf, self.items, session_items, recent_half_life_s)
        self.candidates = Candidates(
            self.mf, self.popularity, ann_min_items, ann_expansion, ann_pending_max, ann_background
        )
        self.content = ItemContent(
            self.mf,
            content_encoder,
            content_dim,
            content_learning_rate,
            content_refresh_every,
            content_weight,
            n_segments,
            seed,
        )

    @property
    def approximate_index(self) -> ann.FactorIndex | None:
        """The HNSW index lists come from, once built (see ``ann_min_items``)."""
        return self.candidates.index

    @property
    def catalogue(self) -> Catalogue | None:
        """The items the shop described (None until :meth:`add_items`)."""
        return self.content.catalogue

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def refused_updates(self) -> int:
        """Factor updates undone because they would have left a factor non-finite or exploding."""
        return self.mf.refused

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        """Update popularity, the user's history and (for positive events) the factors."""
        if not math.isfinite(ts):
            raise ValueError(f"event time {ts!r} is not finite")
        self.clock = max(self.clock, ts)
        if kind == DISMISS:
            self._dismiss(user, item)
            return
        row = self.items.add(item)
        content = self.content if self.content.catalogue is not None else None
        if content is not None:
            content.observe(row)
        known = self.users.get(user)
        positive = is_positive(kind, rating)
        if content is not None and positive and known is not None and user in self.mf:  # (has a query)
            content.tune_weight(row, known.session, known.consumed, partial(self._blend_of, user, known))
        state = self.users.touch(user)
        previous = state.session
        state.touch(row, kind, ts, kind in CONSUMING_TYPES, self.session_items)
        if kind == "purchase" and self.rebuy_weight:  # weight 0: not listed, so not learned
            self.rebuy.learn_one(row, state.buy(row))
        if not positive:
            return
        weight = self.type_weights.get(kind, 1.0)
        if kind == "rating" and rating is not None:  # 0-5 stars (the codec refuses the rest)
            weight *= min(max(rating, 0.0), 5.0) / 5.0
        if self.covisit_weight:
            self.covisit.learn_one(previous, row, weight, ts)
        if row not in state.consumed:
            state.remember(row, kind, weight, ts, self.recent_half_life_s, self.recent_memory)
        self.popularity.learn_one(row, weight, ts)
        negatives = self.negatives.sample(self.items.ids, self.content.stream_rows)
        if content is not None:
            content.warm_start([item, *negatives])
        if not self.mf.learn_one(user, item, weight, negatives):
            log.debug("update of %r by %r refused: factors would be non-finite or exploding", user, item)
            return
        self.negatives.positives.add(row)
        self.candidates.changed(chain((row,), map(self.items.row, negatives)))  # read only with an index
        if content is not None:
            content.learn_positive(user, row)

    def _dismiss(self, user: str, item: str) -> None:
        """The shopper swiped away a push of ``item``: their interest in it ends, and their factors
        take one negative step on it. Not a visit: the session and last event time stay."""
        state, row = self.users.get(user), self.items.find(item)
        if state is None or row is None:  # nothing learned of them to lower
            return
        state.drop_interest(row)
        if self.mf.learn_one(user, item, 0.0, (), liked=False):
            self.candidates.changed((row,))

    def add_items(
        self, items: Sequence[str], titles: Sequence[str | None], categories: Sequence[str | None]
    ) -> int:
        """Announce catalogue items (new, or with changed text): embed their content in one batch;
        an item nobody has touched yet gets factors predicted from it. Returns how many were embedded."""
        return self.content.add_items(items, titles, categories)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything learned, as JSON-able metadata and numpy arrays (see ``infra.checkpoint``)."""
        meta, arrays = self.item_state()
        user_meta, user_arrays = self.users.state(self.users.ids())
        return {**meta, **user_meta}, {**arrays, **user_arrays}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` into this freshly built recommender (same settings)."""
        self.restore_items(meta, arrays)
        self.users.drop(self.users.ids())
        self.users.restore(meta, arrays)

    def item_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What no user owns: item factors, popularity, the catalogue and its content, the random
        generators. (A worker checkpoints it once; its users' state goes by partition.)"""
        mf_meta, arrays = self.mf.item_state()
        pop_meta, pop_arrays = self.popularity.state()
        content_meta, content_arrays = self.content.state()
        covisit_meta, covisit_arrays = self.covisit.state()
        meta: dict[str, Any] = {
            "items": list(self.items.ids),  # a copy: it may be serialised in another thread
            "mf": mf_meta,
            "popularity": pop_meta,
            **self.negatives.state(),
            **content_meta,
            "covisit": covisit_meta,
            "clock": self.clock if math.isfinite(self.clock) else None,
        }
        return meta, {**arrays, **content_arrays, **pop_arrays, **covisit_arrays, **self.rebuy.state()[1]}

    def restore_items(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`item_state`; the users held are kept."""
        self.items.restore(meta["items"])
        self.mf.restore_items(meta["mf"], arrays)
        self.popularity.restore(meta["popularity"], arrays)
        self.negatives.restore(meta)
        self.candidates.reset()  # rebuilt from the restored factors
        self.content.restore(meta, arrays)
        self.covisit.restore(meta.get("covisit"), arrays)
        if meta.get("clock") is not None:  # (a state saved before the clock was kept: none)
            self.clock = max(self.clock, meta["clock"])
        self.rebuy.restore(arrays)
        if self.candidates.background:
            self.candidates.current()  # a large catalogue's index starts building now, not at a list

    def forget(self, user: str) -> bool:
        """Erase the user's history and factors; False if the model never saw them."""
        self._last_related = None  # it may hold their last items and purchases
        return self.users.drop([user])

    def recommend(
        self,
        user: str,
        n: int | None = None,
        exact: bool = False,
        explain: bool = False,
        now: float | None = None,
    ) -> TopN:
        """The user's top-``n``; never an item they consumed. Leaves what was learned unchanged
        (it may bring the approximate index up to date). ``exact=True`` scores every item even
        where the approximate index would be used (to measure its recall); ``explain=True`` adds
        a reason per item and the user's interest segment (what the stored lists carry).
        ``now``: the time ranked at (default: the stream's, :attr:`clock`), which says whether
        the shopper has left (:meth:`is_away`)."""
        return self.recommend_many([user], n, exact, explain, now)[0]

    def is_away(self, state: UserState | None, now: float | None = None) -> bool:
        """Whether the shopper of ``state`` has been quiet for ``visit_gap_s`` at ``now``
        (default: :attr:`clock`)."""
        now = self.clock if now is None else now
        return state is not None and now - state.last_ts >= self.visit_gap_s

    def recommend_many(
        self,
        users: Sequence[str],
        n: int | None = None,
        exact: bool = False,
        explain: bool = False,
        now: float | None = None,
    ) -> list[TopN]:
        """:meth:`recommend` for each user, the same lists; with the approximate index, one
        search for all of them, on every thread (what a micro-batch's re-ranking costs at a
        million items is mostly that search)."""
        n = self.n if n is None else n
        tops: list[TopN] = []
        known: list[tuple[int, UserState, np.ndarray, Related]] = []  # list position, ...
        away: list[bool] = []
        for user in users:
            state = self.users.get(user)
            away.append(self.is_away(state, now))
            query = None
            if state is not None and state.events >= self.min_user_events:
                query = self._query(user, state)
            if query is None:
                scores = self.popularity.scores()
                consumed = state.consumed if state is not None else ()
                exclude = [r for r in consumed if r < scores.size]
                rows, values = top_n(scores, n, exclude=exclude, in_place=True)
                tops.append(self._top(user, rows, values, POPULARITY, state, None, explain, away=away[-1]))
                continue
            assert state is not None
            known.append((len(tops), state, query, self._related(state)))
            tops.append(TopN(user, [], [], MODEL_NAME))  # ranked below
        if not known:
            return tops
        # Bought items shoppers buy again come back: excluded is the rest of the consumed.
        excluded = [extras.excluded(state.consumed) for _, state, _, extras in known]
        shared: _Shared | None = None
        mine: list[np.ndarray] = []
        index = None if exact else self.candidates.current()
        if index is not None:  # (else every item is scored)
            queries = np.stack([query for _, _, query, _ in known])
            owns = [[*state.interest_rows, *extras.rows] for _, state, _, extras in known]
            rows, mine = self.candidates.search(index, queries, n, owns, excluded)
            shared = _Shared(rows, self.mf.item_matrix()[rows], np.zeros(rows.size, dtype=np.float32))
            if self.popularity_weight:
                self.popularity.add_normalised(shared.popularity, self.popularity_weight, rows)
        together = _together(len(known), len(self.items)) if shared is None else 0
        for i, (at, state, query, extras) in enumerate(known):
            user = tops[at].user_id
            rules = self.covisit_weight * (self.covisit_away_share if away[at] else 1.0)
            if shared is None:
                if not together:
                    scores = self._blend(query, state, extras=extras, text=False, rules=rules)
                else:
                    if i % together == 0:  # the next users' shared part, in one product
                        base = self._base_scores(np.stack([q for _, _, q, _ in known[i : i + together]]))
                    scores = base[i % together]
                    self._add_own(scores, state, None, extras, text=False, rules=rules)
                # ``scores`` is a fresh array, so exclusions may be masked in place.
                if self._text_match:
                    rows, values = self.content.top_n_with_match(scores, state.session, n, excluded[i])
                else:
                    rows, values = top_n(scores, n, exclude=excluded[i], in_place=True)
            else:
                rows, values = self._top_of(query, state, extras, rules, n, excluded[i], shared, mine[i])
            tops[at] = self._top(user, rows, values, MODEL_NAME, state, query, explain, extras, away[at])
        return tops

    def _top_of(
        self,
        query: np.ndarray,
        state: UserState,
        extras: Related,
        rules: float,
        n: int,
        excluded: np.ndarray,
        shared: _Shared,
        mine: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top ``n`` of a user's approximate candidates: the batch's ``shared`` rows and the
        user's own, ``mine`` (:meth:`Candidates.search`), blended alike; never an ``excluded``
        row; ties towards the lower row."""
        common = shared.factors @ query
        common += shared.popularity
        self._add_own(common, state, shared.rows, extras, text=True, rules=rules)
        rows = np.concatenate([shared.rows, mine])
        scores = np.concatenate([common, self._blend(query, state, mine, extras, rules=rules)])
        out = excluded[:0]
        if excluded.size and shared.rows.size:  # (``mine`` holds none)
            at, present = locate(shared.rows, excluded)
            out = at[present]
        picked, values = top_n(scores, n, exclude=out, in_place=True, ties=rows)
        return rows[picked], values

    def build_index(self) -> ann.FactorIndex | None:
        """Build the approximate index now and wait for it (None when it does not apply)."""
        return self.candidates.build()

    def user_query(self, user: str) -> np.ndarray | None:
        """The vector a known user's items are scored against (None for a user without factors)."""
        state = self.users.get(user)
        return None if state is None else self._query(user, state)

    def _top(
        self,
        user: str,
        rows: np.ndarray,
        values: np.ndarray,
        model: str,
        state: UserState | None,
        query: np.ndarray | None,
        explain: bool,
        extras: Related | None = None,
        away: bool = False,
    ) -> TopN:
        ids = self.items.ids
        if not explain:
            return TopN(user, [ids[r] for r in rows.tolist()], values.tolist(), model, away=away)
        segment, tags = self.content.segment(user) if query is not None else (None, [])
        return TopN(
            user,
            [ids[r] for r in rows.tolist()],
            values.tolist(),
            model,
            self._explain(rows, state if model == MODEL_NAME else None, extras),
            tags,
            segment,
            away,
        )

    def _explain(self, rows: np.ndarray, state: UserState | None, extras: Related | None) -> list[str]:
        if state is None or not state.entries:
            return [POPULAR_REASON] * len(rows)
        catalogue = self.catalogue
        text = None if catalogue is None else catalogue.vectors
        cold = np.zeros(len(rows), dtype=bool) if catalogue is None else catalogue.is_cold(rows)
        history = state.history(rows)
        out = reasons(rows, history, self.mf.item_matrix(), text, cold, self.content.title)
        if extras is not None:
            sources = partial(self.covisit.sources, state.session)
            extras.explain(rows.tolist(), out, history, self.content.title, sources)
        return out

    def _related(self, state: UserState) -> Related:
        """``state``'s rule candidates and returning purchases. The last answer is kept while the
        shopper's last items and purchases, the rules and the repeat counts stay the same: a
        replay (``evaluate``) ranks a shopper and then learns their event, whose text weight
        step (with a catalogue) needs them again."""
        key = (
            state.entries.tobytes(),
            state.bought.tobytes() if state.bought else b"",
            self.covisit.version if self.covisit_weight else -1,
            self.rebuy.version if self.rebuy_weight else -1,
        )
        if self._last_related is not None and self._last_related[0] == key:
            return self._last_related[1]
        extras = related(
            state, self.covisit if self.covisit_weight else None, self.rebuy if self.rebuy_weight else None
        )
        self._last_related = key, extras
        return extras

    def _query(self, user: str, state: UserState) -> np.ndarray | None:
        """The user's vector plus the session part, or None for a user without factors."""
        query = self.mf.user_vector(user)
        if query is not None and self.session_weight and state.entries:
            session = state.session
            matrix = self.mf.item_matrix()
            query += (self.session_weight / len(session)) * matrix[session].sum(axis=0)
        return query

    def _blend(
        self,
        query: np.ndarray,
        state: UserState,
        rows: np.ndarray | None = None,
        extras: Related | None = None,
        text: bool = True,
        rules: float | None = None,
    ) -> np.ndarray:
        """Blended scores of ``rows`` (sorted, unique; None = every item), in that order;
        ``text=False`` leaves out the text match (the caller adds it where it counts); ``rules``:
        the rules' weight (None: ``covisit_weight``, a shopper in a visit)."""
        matrix = self.mf.item_matrix()
        scores = matrix @ query if rows is None else matrix[rows] @ query
        if self.popularity_weight:
            self.popularity.add_normalised(scores, self.popularity_weight, rows)
        self._add_own(scores, state, rows, extras, text, rules)
        return scores

    def _blend_of(self, user: str, state: UserState, rows: np.ndarray) -> np.ndarray:
        """:meth:`_blend` of ``rows`` without the text match, for a user with factors."""
        query = self._query(user, state)
        assert query is not None
        return self._blend(query, state, rows, text=False)

    def _base_scores(self, queries: np.ndarray) -> np.ndarray:
        """The factor and popularity parts of the blend for every item, one row per query, in
        one matrix product: it reads the item matrix once instead of once per user (at 35k
        items 15-28 µs a user instead of 50). BLAS sums it in another order than one user's
        product, so a score may differ in its last bit (1e-7 relative) from :meth:`_blend`'s."""
        scores = queries @ self.mf.item_matrix().T
        if self.popularity_weight:
            for row in scores:
                self.popularity.add_normalised(row, self.popularity_weight)
        return scores

    def _add_own(
        self,
        scores: np.ndarray,
        state: UserState,
        rows: np.ndarray | None,
        extras: Related | None,
        text: bool,
        rules: float | None = None,
    ) -> None:
        """Add the user's own parts of the blend to ``scores`` (of ``rows``, as in :meth:`_blend`)."""
        if self.recent_weight and state.interest:
            touched, own = state.interest_scores(self.recent_weight, self.recent_half_life_s)
            add_at(scores, rows, touched, own)
        extras = self._related(state) if extras is None else extras
        rules = self.covisit_weight if rules is None else rules
        add_at(scores, rows, extras.covisit_rows, rules * extras.covisit_scores)
        add_at(scores, rows, extras.again_rows, self.rebuy_weight * extras.again_scores)
        if text and self._text_match:
            self.content.add_match(scores, state.session, rows)

    @property
    def _text_match(self) -> bool:
        return self.content.catalogue is not None and bool(self.content.weight)
