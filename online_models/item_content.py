"""The catalogue's part of the model: items the shop describes are embedded from their text
(``online_models.content``); an item nobody touched yet gets factors predicted from it and
scores a learned text-match term; users are grouped into interest segments
(``online_models.segments``). Inactive (every method a no-op) until the first items arrive."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from online_models.content import Catalogue, make_encoder
from online_models.mf import ImplicitMF
from online_models.sampling import rng_state, set_rng_state
from online_models.segments import InterestSegments
from online_models.topn import kth_largest, top_n

# Step of the online update of ``weight`` (from the runs in docs/quality.md: 0.1 learned too
# slowly to help the shop with new arrivals, 3 overshot on the back catalogue).
_WEIGHT_STEP = 1.0


class ItemContent:
    """Catalogue, cold-item predictions, the text-match term of the blend and interest segments."""

    def __init__(
        self,
        mf: ImplicitMF,
        encoder: str = "hashed",
        dim: int = 256,
        learning_rate: float = 0.01,
        refresh_every: int = 1000,
        weight: float = 0.0,
        n_segments: int = 8,
        seed: int = 42,
    ) -> None:
        """``encoder``: "hashed", "minilm" or "off" (items are then ignored). Untouched items'
        factors are re-predicted every ``refresh_every`` positive events; ``weight`` is the
        starting weight of the text match (then learned online, see :meth:`tune_weight`)."""
        self.mf = mf
        self.encoder = encoder
        self.dim = dim
        self.learning_rate = learning_rate
        self.refresh_every = refresh_every
        self.weight = self._first_weight = weight
        self._rng = random.Random(seed + 1)
        self.catalogue: Catalogue | None = None  # made when the first items are announced
        self.segments = InterestSegments(n_segments, seed)  # learned once there is a catalogue
        # Rows seen in the event stream, in order of first sight; None = every row (no catalogue).
        self.stream_rows: list[int] | None = None
        self._in_stream: set[int] = set()
        self._positives_since_refresh = 0
        # The text-to-factors map and the text weight as of the last take of changes (see
        # take_changes); None while changes are not tracked or before the first items.
        self._base: tuple[np.ndarray, float] | None = None
        self._tracking = False
        # Other workers' changes to the map that came before this worker's first items (summed;
        # added to the map when it is made).
        self._early: np.ndarray | None = None

    def category(self, row: int) -> str | None:
        """The catalogue's category of ``row`` (None: none named, or no catalogue)."""
        return self.catalogue.categories.get(row) if self.catalogue is not None else None

    def add_items(
        self, items: Sequence[str], titles: Sequence[str | None], categories: Sequence[str | None]
    ) -> int:
        """Embed new or changed items in one batch; an item nobody has touched yet gets factors
        predicted from its text. Returns how many were embedded."""
        if self.encoder == "off":
            return 0
        if self.catalogue is None:
            self.catalogue = self._new_catalogue()
            self._set_stream_rows(list(range(len(self.mf.items))))  # every row so far came from events
            early, self._early = self._early, None
            if early is not None and early.shape == self.catalogue.projection.weights.shape:
                self.catalogue.projection.weights += early
            self._mark()
        rows = [self.mf.items.add(item) for item in items]
        embedded = self.catalogue.add(rows, titles, categories)
        ids, learned = self.mf.items.ids, self.mf.has_factors
        cold = np.array([row for row in embedded if not learned(ids[row])], dtype=np.int64)
        self.catalogue.mark_cold(cold.tolist())
        if cold.size:  # the others keep theirs until the next refresh (see _predict_cold)
            self.mf.set_rows(cold, self.catalogue.predict(cold))
        return len(embedded)

    def observe(self, row: int) -> None:
        """An event touched ``row``: it is now an item of the stream (a negative candidate)."""
        if self.stream_rows is not None and row not in self._in_stream:
            self._in_stream.add(row)
            self.stream_rows.append(row)

    def tune_weight(
        self, target: int, session: Collection[int], consumed: Collection[int], score: Callable
    ) -> None:
        """One pairwise (BPR) step on ``weight`` before a positive event is learned: the target
        against a random item, both scored by ``score(rows)`` (the blend without the text match,
        which this adds: it has the match already). Text similarity earns
        weight where untouched items do get picked (a shop's new arrivals) and loses it where it
        only pushes ignored items up (a back catalogue nobody rated yet)."""
        other = self._rng.randrange(len(self.mf.items))
        if other == target or other in consumed:
            return
        catalogue = self.catalogue
        assert catalogue is not None
        if not (catalogue.is_cold_row(target) or catalogue.is_cold_row(other)):
            return  # neither has a text match: no step
        profile = catalogue.profile(session)
        if profile is None:
            return
        match_target, match_other = catalogue.match_one(profile, target), catalogue.match_one(profile, other)
        if match_target == match_other:
            return
        first, second = score(np.array(sorted((target, other)), dtype=np.int64)).tolist()
        score_target, score_other = (first, second) if target < other else (second, first)
        # The text term as the blend adds it.
        margin = score_target - score_other + self.weight * (match_target - match_other)
        step = _WEIGHT_STEP * (match_target - match_other) / (1.0 + math.exp(min(margin, 50.0)))
        self.weight = max(0.0, self.weight + step)

    def warm_start(self, names: Sequence[str]) -> None:
        """A cold item about to be learned starts from its predicted factors, not random ones."""
        assert self.catalogue is not None
        for name in names:
            row = self.mf.items.row(name)
            if self.catalogue.warm(row):
                self.mf.seed_items([name], self.mf.item_matrix()[row : row + 1].copy())

    def learned(self, rows: Sequence[int]) -> None:
        """``rows`` got factors learned elsewhere (another worker's): they are cold no more."""
        if self.catalogue is not None:
            for row in rows:
                self.catalogue.warm(row)

    # --- one text model for several workers (online_models.item_sync) ---------------------------

    def track_changes(self) -> None:
        """From now on remember what learning changes in the text-to-factors map and the text
        weight (take_changes): the group learns them together, like the item factors."""
        self._tracking = True
        self._mark()

    def take_changes(self) -> tuple[np.ndarray, float]:
        """What learning added to the map's weights and to the text weight since tracking started
        or the last call (an empty map without a catalogue or when the map did not change)."""
        if self._base is None or self.catalogue is None:
            return np.empty((0, 0), dtype=np.float32), 0.0
        weights, weight = self._base
        projection, step = self.catalogue.projection.weights - weights, self.weight - weight
        self._mark()
        return projection if projection.any() else np.empty((0, 0), dtype=np.float32), step

    def add_changes(self, projection: np.ndarray, weight: float) -> None:
        """Add another worker's :meth:`take_changes` (not taken as this one's own). A map of
        another shape (a worker with another encoder) is passed over; an empty one is no change.
        Before this worker's first items, the map's changes wait for its map."""
        weights = self.catalogue.projection.weights if self.catalogue is not None else None
        if projection.size and weights is not None and projection.shape != weights.shape:
            return
        before = self.weight
        self.weight = max(0.0, before + weight)
        if projection.size and weights is not None:
            weights += projection
        elif projection.size and (self._early is None or self._early.shape == projection.shape):
            self._early = projection.copy() if self._early is None else self._early + projection
        if self._base is not None:  # (None without a map)
            base = self._base[0] + projection if projection.size else self._base[0]
            self._base = base, self._base[1] + self.weight - before

    def discard_changes(self) -> None:
        """Undo what learning changed since the last take (the group holds it already)."""
        if self._base is not None and self.catalogue is not None:
            self.catalogue.projection.weights[:] = self._base[0]
            self.weight = self._base[1]

    def _mark(self) -> None:
        if self._tracking and self.catalogue is not None:
            self._base = self.catalogue.projection.weights.copy(), self.weight

    def learn_positive(self, user: str, row: int) -> None:
        """After the factors learned a positive: the text-to-factors map and the segments learn
        from it, and every ``refresh_every`` positives the cold items are re-predicted."""
        assert self.catalogue is not None
        self.catalogue.learn_one(row, self.mf.item_matrix()[row])
        self.segments.learn_one(self.mf.user_vector(user), self.catalogue.terms(row))  # type: ignore[arg-type]
        self._positives_since_refresh += 1
        if self._positives_since_refresh >= self.refresh_every:
            self._predict_cold()

    def add_match(self, scores: np.ndarray, session: Collection[int], rows: np.ndarray | None) -> None:
        """Items nobody touched yet also score by how close their text is to the user's last items'
        (cosine of content embeddings, times ``weight``); ``rows`` as in the blend."""
        catalogue = self.catalogue
        assert catalogue is not None
        if not catalogue.n_cold:
            return
        if rows is not None:
            where = np.flatnonzero(catalogue.is_cold(rows))
            if not where.size:  # before the profile: most rows are warm
                return
        profile = catalogue.profile(session)
        if profile is None:
            return
        w = np.float32(self.weight)
        if rows is None:  # every item: one product over the cold ones
            cold, match = catalogue.match_cold(profile)
            matched = np.flatnonzero(match != 0)  # a hashed profile shares no word with most items
            scores[cold[matched]] += w * match[matched]
        else:
            scores[where] += w * catalogue.match_rows(profile, rows[where])

    def top_n_with_match(
        self, scores: np.ndarray, session: Collection[int], n: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``top_n`` of ``scores`` after :meth:`add_match` over every item, never an ``excluded``
        row (``scores`` is the caller's to overwrite), with the text matched only for the cold
        items it could lift into the top ``n``. Warm items keep their scores, so the ``n``-th
        best score after the match is at least the ``n``-th best warm one; a match is a cosine
        (at most 1), so a cold item more than ``weight`` below that cannot get in. Usually none
        is close enough; the top ``n`` is then among the warm items at or above that floor."""
        catalogue = self.catalogue
        assert catalogue is not None
        if not catalogue.n_cold or not self.weight:
            return top_n(scores, n, exclude=excluded, in_place=True)
        scores[excluded] = -np.inf
        floor, above = kth_largest(scores, n)
        if catalogue.is_cold(above).any():  # usually the best n before the match are all warm
            warm = scores.copy()
            warm[catalogue.packed_cold] = -np.inf
            floor, above = kth_largest(warm, n)
        if floor == -np.inf:  # fewer than n warm items to list
            self.add_match(scores, session, None)
            return top_n(scores, n, exclude=excluded, in_place=True)
        reach = self.weight * (1.0 + 1e-5)  # a float cosine may exceed 1 by a rounding error
        lifted = catalogue.cold_at_least(scores, floor - reach)
        if lifted.size > catalogue.n_cold // 4:  # one product over the cold, then what it lifted
            self.add_match(scores, session, None)
            lifted = lifted[scores[lifted] >= floor]  # (no other cold row came within reach)
        elif lifted.size:
            matched = scores[lifted]
            self.add_match(matched, session, lifted)
            scores[lifted] = matched
        # As top_n: best first, ties towards the lower row.
        candidates = np.concatenate([above, lifted])
        chosen = candidates[np.lexsort((candidates, -scores[candidates]))[:n]]
        return chosen, scores[chosen]

    def segment(self, user: str) -> tuple[int | None, list[str]]:
        """The user's interest segment and its tags (None, [] without a catalogue or factors)."""
        taste = self.mf.user_vector(user) if self.catalogue is not None else None
        if taste is None:  # the vector segments learn from (not the session-shifted query)
            return None, []
        return self.segments.name(taste)

    def title(self, row: int) -> str:
        title = self.catalogue.titles.get(row) if self.catalogue is not None else None
        return title or self.mf.items.ids[row]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.catalogue is None:
            return {}, {}
        content_meta, arrays = self.catalogue.state()
        cold = np.array(content_meta["cold"], dtype=np.int64)
        meta = {
            "segments": self.segments.state(),
            "content_weight": self.weight,
            "content_rng": rng_state(self._rng),
            "content": content_meta,
            "content_since_refresh": self._positives_since_refresh,
            "stream_rows": self.stream_rows,
        }
        return meta, {**arrays, "content_cold_factors": self.mf.item_matrix()[cold].copy()}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.catalogue, self._base, self._early = None, None, None
        self._set_stream_rows(None)
        if "content" not in meta:  # (the group's records after it are read again)
            self.weight = self._first_weight
            return
        self.catalogue = self._new_catalogue()
        self.catalogue.restore(meta["content"], arrays)
        cold = np.array(meta["content"]["cold"], dtype=np.int64)
        self.mf.set_rows(cold, arrays["content_cold_factors"])
        self._positives_since_refresh = meta["content_since_refresh"]
        self._set_stream_rows(list(meta["stream_rows"]))
        self.segments.restore(meta["segments"])
        self.weight = meta["content_weight"]
        set_rng_state(self._rng, meta["content_rng"])
        self._mark()

    def _new_catalogue(self) -> Catalogue:
        return Catalogue(make_encoder(self.encoder, self.dim), self.mf.n_factors, self.learning_rate)

    def _set_stream_rows(self, rows: list[int] | None) -> None:
        self.stream_rows = rows
        self._in_stream = set(rows or ())

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
