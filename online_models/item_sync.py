"""One item state for several model shards: users are split between shards (as partitions split
them between workers), item state is learned by all of them and merged every ``sync_s`` seconds
of event time.

The merge is additive, so it does not depend on who merges or in what order: each shard reports
what its learning changed since the last merge (the delta of every item's factors, the popularity
counts it learned), the deltas of an item are summed onto the item's merged factors (an item
starts from the same vector everywhere: ``ImplicitMF.initial_vector``) and the counts are added,
and every shard then holds the merged state: every item any shard has seen, with every shard's
counts. This is the protocol a group of workers runs over Kafka; here it runs in process, for
`pushrec evaluate --workers N` (deterministic: shards merge in a fixed order at fixed times).

>>> from online_models.recommender import Recommender
>>> shards = ShardedRecommender([Recommender(n_factors=4, seed=0) for _ in range(2)],
...                             shard_of=lambda user: int(user[-1]), sync_s=1.0)
>>> shards.learn_one("u0", "apple", "click", ts=0.0)
>>> shards.learn_one("u1", "pear", "click", ts=5.0)     # first event past the interval: merge
>>> "apple" in shards.shards[1].items                    # shard 1 now holds shard 0's item
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from online_models.recommender import Recommender, TopN

_ROWS = np.empty(0, dtype=np.int64)


@dataclass
class ItemChanges:
    """What one shard's learning changed in the item state since the last take. Items are named
    once, in ``ids``; every ``*_at`` array holds positions in it (so the changes travel as a few
    arrays whatever their size): factor deltas, the first factors of items seeded from their
    text (see ``ImplicitMF.add_item_deltas``), popularity counts (weight, event time), the
    sequential rules' additions (source, target; scaled to ``rules_t_ref``, see
    ``online_models.covisit``), purchases (and whether that shopper had bought it before), and
    what learning changed in the catalogue's text-to-factors map and text weight (empty without
    a catalogue)."""

    ids: list[str] = field(default_factory=list)
    deltas_at: np.ndarray = field(default_factory=lambda: _ROWS)
    deltas: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    starts_at: np.ndarray = field(default_factory=lambda: _ROWS)
    starts: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    counts_at: np.ndarray = field(default_factory=lambda: _ROWS)
    count_weights: np.ndarray = field(default_factory=lambda: np.empty(0))
    count_times: np.ndarray = field(default_factory=lambda: np.empty(0))
    rules_at: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))
    rule_values: np.ndarray = field(default_factory=lambda: np.empty(0))
    rules_t_ref: float | None = None
    purchases_at: np.ndarray = field(default_factory=lambda: _ROWS)
    purchases_again: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    projection: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    content_weight: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def __bool__(self) -> bool:
        return bool(
            len(self.deltas_at)
            or len(self.counts_at)
            or len(self.rules_at)
            or len(self.purchases_at)
            or self.projection.any()
            or self.content_weight.any()
        )

    def factor_deltas(self) -> dict[str, np.ndarray]:
        """Each changed item's factor delta, by item."""
        ids = self.ids
        return {ids[k]: delta for k, delta in zip(self.deltas_at.tolist(), self.deltas, strict=True)}

    def factor_starts(self) -> dict[str, np.ndarray]:
        """The first factors of each item seeded in this interval, by item."""
        ids = self.ids
        return {ids[k]: start for k, start in zip(self.starts_at.tolist(), self.starts, strict=True)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, by field name (``infra.checkpoint.pack``)."""
        return {name: value for name, value in vars(self).items() if isinstance(value, np.ndarray)}

    @classmethod
    def from_parts(
        cls, ids: list[str], rules_t_ref: float | None, arrays: dict[str, np.ndarray]
    ) -> ItemChanges:
        """The inverse of (``ids``, ``rules_t_ref``, :meth:`arrays`)."""
        return cls(ids=ids, rules_t_ref=rules_t_ref, **arrays)


class ShardedRecommender:
    """``shards[shard_of(user)]`` owns each user; item state is merged every ``sync_s`` seconds
    of event time (None: never, each shard learns items from its own users only)."""

    def __init__(
        self, shards: Sequence[Recommender], shard_of: Callable[[str], int], sync_s: float | None = 1.0
    ) -> None:
        self.shards = list(shards)
        self.shard_of = shard_of
        self.sync_s = sync_s
        self.merges = 0
        self._merged: dict[str, np.ndarray] = {}  # every item's factors as of the last merge
        self._next_merge: float | None = None
        for index, shard in enumerate(self.shards[1:], start=1):
            _split_streams(shard, index)
        if sync_s is not None:
            for shard in self.shards:
                track_changes(shard)

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        if self.sync_s is not None:
            if self._next_merge is None:
                self._next_merge = ts + self.sync_s
            elif ts >= self._next_merge:
                self.merge()
                self._next_merge = ts + self.sync_s
        self.shards[self.shard_of(user)].learn_one(user, item, kind, ts, rating)

    def recommend(self, user: str, n: int | None = None) -> TopN:
        return self.shards[self.shard_of(user)].recommend(user, n)

    def add_items(
        self, items: Sequence[str], titles: Sequence[str | None], categories: Sequence[str | None]
    ) -> int:
        """Announce catalogue items to every shard (every worker reads the whole catalogue); how
        many each embedded."""
        for shard in self.shards:
            embedded = shard.add_items(items, titles, categories)
        return embedded

    def merge(self) -> None:
        """Sum every shard's item changes into the merged state and give it to every shard."""
        changes = [take_changes(shard) for shard in self.shards]
        merged: dict[str, np.ndarray] = {}
        for shard, change in zip(self.shards, changes, strict=True):
            starts = change.factor_starts()
            for item, delta in change.factor_deltas().items():
                start = merged.get(item)
                if start is None:
                    start = self._merged.get(item)
                    if start is None:
                        start = starts[item] if item in starts else shard.mf.initial_vector(item)
                merged[item] = start + delta
        self._merged.update(merged)
        for index, shard in enumerate(self.shards):
            _took_factors(shard, shard.mf.set_items(merged))
            for k, change in enumerate(changes):
                if k != index:
                    _add_others(shard, change)
        self.merges += 1


def _split_streams(shard: Recommender, index: int) -> None:
    """Shard ``index`` of a group draws its own random numbers (sampled negatives, new users'
    first factors) while items start where they start everywhere. Shards drawing the same
    numbers pick correlated negatives (online-retail, 4 shards: HR 0.0455 against 0.0476 with
    streams of their own, mean of 3 seeds)."""
    shard.negatives.rng.seed(f"{shard.mf.seed}/{index}")
    shard.mf.split_streams(index)


def track_changes(shard: Recommender) -> None:
    """From now on the shard remembers its item changes (take_changes)."""
    shard.mf.track_item_changes()
    shard.popularity.track_counts()
    shard.covisit.track_changes()
    shard.rebuy.track_changes()
    shard.content.track_changes()


def take_changes(shard: Recommender) -> ItemChanges:
    """What the shard's learning changed in the item state since the last call."""
    items = shard.items
    deltas, starts = shard.mf.take_item_changes()
    counts = shard.popularity.take_counts()
    pairs, rule_values, t_ref = shard.covisit.take_changes()
    purchases = shard.rebuy.take_changes()
    projection, content_weight = shard.content.take_changes()
    count_rows = np.fromiter((row for row, _, _ in counts), dtype=np.int64, count=len(counts))
    bought = np.fromiter((row for row, _ in purchases), dtype=np.int64, count=len(purchases))
    delta_rows = np.fromiter(map(items.row, deltas), dtype=np.int64, count=len(deltas))
    start_rows = np.fromiter(map(items.row, starts), dtype=np.int64, count=len(starts))
    rows, at = np.unique(
        np.concatenate([delta_rows, start_rows, count_rows, pairs.ravel(), bought]), return_inverse=True
    )
    ends = np.cumsum([len(delta_rows), len(start_rows), len(count_rows), pairs.size])
    ids = items.ids
    return ItemChanges(
        ids=[ids[row] for row in rows.tolist()],
        deltas_at=at[: ends[0]],
        deltas=np.stack(list(deltas.values())) if deltas else np.empty((0, 0)),
        starts_at=at[ends[0] : ends[1]],
        starts=np.stack(list(starts.values())) if starts else np.empty((0, 0)),
        counts_at=at[ends[1] : ends[2]],
        count_weights=np.fromiter((weight for _, weight, _ in counts), dtype=np.float64, count=len(counts)),
        count_times=np.fromiter((ts for _, _, ts in counts), dtype=np.float64, count=len(counts)),
        rules_at=at[ends[2] : ends[3]].reshape(-1, 2),
        rule_values=rule_values,
        rules_t_ref=t_ref,
        purchases_at=at[ends[3] :],
        purchases_again=np.fromiter((again for _, again in purchases), dtype=bool, count=len(purchases)),
        projection=projection,
        content_weight=np.array([content_weight]),
    )


def add_changes(shard: Recommender, change: ItemChanges) -> None:
    """Add another worker's item changes (the live protocol, ``consumers.item_exchange``)."""
    _took_factors(shard, shard.mf.add_item_deltas(change.factor_deltas(), change.factor_starts()))
    _add_others(shard, change)


def discard_changes(shard: Recommender) -> None:
    """Undo the item changes learned since the last take: the group holds them already."""
    shard.candidates.changed(shard.mf.discard_item_changes())
    for row, weight, ts in shard.popularity.take_counts():
        shard.popularity.learn_one(row, -weight, ts, share=False)
    shard.covisit.discard_changes()
    shard.rebuy.discard_changes()
    shard.content.discard_changes()


def _took_factors(shard: Recommender, rows: list[int]) -> None:
    """``rows`` hold the group's factors now: learned (no longer cold), and moved for the index."""
    shard.content.learned(rows)
    shard.candidates.changed(rows)


def _add_others(shard: Recommender, change: ItemChanges) -> None:
    """Another shard's counts, rules, purchases and text model (not shared again); its factors
    are the caller's (summed or added)."""
    add = shard.items.add
    rows = np.fromiter(map(add, change.ids), dtype=np.int64, count=len(change.ids))
    learn, positives = shard.popularity.learn_one, shard.negatives.positives
    for row, weight, ts in zip(
        rows[change.counts_at].tolist(),
        change.count_weights.tolist(),
        change.count_times.tolist(),
        strict=True,
    ):
        learn(row, weight, ts, share=False)
        positives.add(row)
    shard.covisit.add_changes(rows[change.rules_at], change.rule_values, change.rules_t_ref)
    for row, again in zip(rows[change.purchases_at].tolist(), change.purchases_again.tolist(), strict=True):
        shard.rebuy.learn_one(row, again, share=False)
    if change.projection.size or change.content_weight.any():
        shard.content.add_changes(change.projection, float(change.content_weight.sum()))
