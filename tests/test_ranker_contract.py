"""The contract every ranker of `pushrec evaluate` passes: the product model and each baseline."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.settings import ModelSettings
from online_models.baselines import (
    ALSRanker,
    FunkMFRanker,
    PopularityRanker,
    RecentRanker,
    SequentialRulesRanker,
)
from online_models.evaluation import Ranker
from online_models.recommender import Recommender

RANKERS: dict[str, Callable[[], Ranker]] = {
    "pushrec": lambda: Recommender(n_factors=8, seed=3),
    # the same model answering from its approximate index (pending rows flushed every 5 changes)
    "pushrec-ann": lambda: Recommender(
        n_factors=8, seed=3, ann_min_items=1, ann_pending_max=5, ann_background=False
    ),
    "popularity": PopularityRanker,
    "recent": RecentRanker,
    "funkmf": lambda: FunkMFRanker(seed=3),
    "sr": SequentialRulesRanker,  # (repeat lists consumed items on purpose: buying again)
    "als": lambda: ALSRanker(every=7, factors=8, iterations=5, seed=3),
}
KINDS = ("view", "click", "add_to_cart", "purchase", "rating")


def checkerboard_log(n: int = 12, epochs: int = 30) -> list[tuple[str, str]]:
    """Users buy items of their own parity; the diagonal (u, u) is withheld."""
    return [
        (f"u{u}", f"i{i}")
        for _ in range(epochs)
        for u in range(n)
        for i in range(n)
        if (u + i) % 2 == 0 and u != i
    ]


@pytest.mark.parametrize(
    "make",
    [RANKERS["pushrec"], RANKERS["pushrec-ann"], lambda: ALSRanker(every=60, factors=8, seed=3)],
    ids=["pushrec", "pushrec-ann", "als"],
)
def test_checkerboard_known_answer(make: Callable[[], Ranker]) -> None:
    """Purchased items are excluded, so the one same-parity item left, the diagonal, must be top-1
    (pushrec's buying again off: it would list the items bought 30 times, rightly).

    (popularity, recent and funkmf cannot learn parity: funkmf sees no negatives, the other two
    nothing personal to rank by.)
    """
    ranker = make()
    if isinstance(ranker, Recommender):  # every item here is bought 30 times: buying again aside
        ranker.rebuy_weight = 0.0
    for t, (user, item) in enumerate(checkerboard_log()):
        ranker.learn_one(user, item, "purchase", float(t))
    assert [ranker.recommend(f"u{u}", 1).items for u in range(12)] == [[f"i{u}"] for u in range(12)]


events = st.lists(
    st.tuples(
        st.sampled_from([f"u{i}" for i in range(5)]),
        st.sampled_from([f"i{i}" for i in range(8)]),
        st.sampled_from(KINDS),
        st.sampled_from([0.5, 2.0, 4.0, 5.0]),
        st.floats(0, 1e9, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


def _learn(ranker: Ranker, log: list[tuple[str, str, str, float, float]]) -> None:
    for user, item, kind, rating, ts in log:
        ranker.learn_one(user, item, kind, ts, rating if kind == "rating" else None)


@pytest.mark.parametrize("name", RANKERS)
@settings(max_examples=30, deadline=None)
@given(log=events, n=st.integers(1, 10))
def test_lists_are_sorted_unique_finite_and_never_hold_consumed_items(name: str, log: list, n: int) -> None:
    ranker = RANKERS[name]()
    _learn(ranker, log)
    consumed: dict[str, set[str]] = {}
    bought: dict[str, set[str]] = {}
    purchases: Counter[str] = Counter()
    repeats: Counter[str] = Counter()
    for user, item, kind, _, _ in log:
        if kind in ("purchase", "rating"):
            consumed.setdefault(user, set()).add(item)
        if kind == "purchase":
            purchases[item] += 1
            repeats[item] += item in bought.get(user, set())
            bought.setdefault(user, set()).add(item)
    # pushrec lists a bought item again when its repeat share, smoothed towards the shop's, is
    # at least its default.
    shop = sum(repeats.values()) / max(1, sum(purchases.values()))
    floor = ModelSettings().rebuy_min_share
    again = {item for item in purchases if (repeats[item] + shop) / (purchases[item] + 1) >= floor}
    for user in {u for u, *_ in log} | {"cold"}:
        top = ranker.recommend(user, n)
        assert len(top.items) == len(set(top.items)) <= n
        assert top.scores == sorted(top.scores, reverse=True)
        assert all(math.isfinite(s) for s in top.scores)
        allowed = bought.get(user, set()) & again if name.startswith("pushrec") else set()
        assert not (consumed.get(user, set()) - allowed) & set(top.items)


@pytest.mark.parametrize("name", RANKERS)
@settings(max_examples=15, deadline=None)
@given(log=events, later=events)
def test_scoring_a_cold_user_changes_nothing(name: str, log: list, later: list) -> None:
    """A twin that never scored the stranger gives the same lists after both learn more (the
    stranger included): scoring drew no random number and inserted no factors."""
    probed, twin = RANKERS[name](), RANKERS[name]()
    _learn(probed, log)
    _learn(twin, log)
    for _ in range(3):
        probed.recommend("stranger", 5)
    later = [("stranger", *rest) for _, *rest in later[:3]] + later
    _learn(probed, later)
    _learn(twin, later)
    for user in {u for u, *_ in log + later}:
        assert probed.recommend(user, 5) == twin.recommend(user, 5)
