"""The ranker contract, the top-N helper and popularity, on the pure models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from online_models.pipeline import RefreshPipeline
from online_models.popularity import Popularity
from online_models.recommender import POPULARITY, Recommender
from online_models.topn import top_n

EVENT_KINDS = ("view", "click", "add_to_cart", "purchase")


def checkerboard(n: int = 12, epochs: int = 30) -> Recommender:
    """Users like items of their own parity; the diagonal (u, u) is withheld."""
    rec = Recommender(n_factors=8, seed=3, negatives=4, learning_rate=0.1)
    t = 0.0
    for _ in range(epochs):
        for u in range(n):
            for i in range(n):
                if (u + i) % 2 == 0 and u != i:
                    t += 1
                    rec.learn_one(f"u{u}", f"i{i}", "purchase", t)
    return rec


def test_checkerboard_known_answer() -> None:
    """Purchased items are excluded, so the only same-parity item left, the diagonal, must be top-1."""
    rec = checkerboard()
    assert [rec.recommend(f"u{u}", 1).items for u in range(12)] == [[f"i{u}"] for u in range(12)]


def test_scoring_a_cold_user_leaves_the_model_unchanged() -> None:
    rec = checkerboard(n=6, epochs=2)
    users_before = set(rec.mf._mf.u_latents)
    items_before = set(rec.mf._mf.i_latents)
    matrix_before = rec.mf.item_matrix().copy()
    top = rec.recommend("never-seen")
    assert top.model == POPULARITY and top.items
    assert rec.mf.score_many("never-seen") is None
    assert set(rec.mf._mf.u_latents) == users_before
    assert set(rec.mf._mf.i_latents) == items_before
    np.testing.assert_array_equal(rec.mf.item_matrix(), matrix_before)


def test_item_matrix_tracks_river_factors() -> None:
    rec = checkerboard(n=6, epochs=2)
    for item in rec.items.ids:
        row = rec.mf.item_matrix()[rec.items.row(item)]
        np.testing.assert_allclose(row, rec.mf._mf.i_latents[item].astype(np.float32))


events = st.lists(
    st.tuples(
        st.sampled_from([f"u{i}" for i in range(5)]),
        st.sampled_from([f"i{i}" for i in range(8)]),
        st.sampled_from(EVENT_KINDS),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(events, st.integers(1, 10))
def test_lists_are_sorted_unique_finite_and_never_hold_consumed_items(log: list, n: int) -> None:
    rec = Recommender(n_factors=4, seed=0, negatives=2, learning_rate=0.5)
    consumed: dict[str, set[str]] = {}
    for t, (user, item, kind) in enumerate(log):
        rec.learn_one(user, item, kind, float(t))
        if kind == "purchase":
            consumed.setdefault(user, set()).add(item)
    for user in {u for u, _, _ in log} | {"cold"}:
        top = rec.recommend(user, n)
        assert len(top.items) == len(set(top.items)) <= n
        assert top.scores == sorted(top.scores, reverse=True)
        assert all(math.isfinite(s) for s in top.scores)
        assert not consumed.get(user, set()) & set(top.items)
    assert np.isfinite(rec.mf.item_matrix()).all()


def test_rating_below_four_is_consumed_but_not_learned() -> None:
    rec = Recommender(n_factors=4, seed=0)
    rec.learn_one("u", "meh", "rating", 1.0, rating=2.0)
    assert "u" not in rec.mf  # no positive yet: no factors
    assert "meh" not in rec.recommend("u").items


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.integers(0, 60), st.data())
def test_top_n_contract(values: list[float], n: int, data: st.DataObject) -> None:
    scores = np.array(values)
    exclude = data.draw(st.sets(st.integers(0, len(values) - 1)))
    idx, top = top_n(scores, n, exclude)
    assert len(idx) == min(n, len(values) - len(exclude))
    assert len(set(idx.tolist())) == len(idx)
    assert not set(idx.tolist()) & exclude
    assert list(top) == sorted(top, reverse=True)
    kept = sorted((scores[i] for i in range(len(values)) if i not in exclude), reverse=True)
    assert list(top) == kept[: len(idx)]


def test_top_n_breaks_ties_by_lower_index() -> None:
    idx, _ = top_n(np.zeros(10), 3)
    assert idx.tolist() == [0, 1, 2]


def test_popularity_decays_with_event_time() -> None:
    pop = Popularity(half_life_s=100.0)
    pop.learn_one(0, 1.0, ts=0.0)
    pop.learn_one(1, 1.0, ts=100.0)
    np.testing.assert_allclose(pop.scores(), [0.5, 1.0])


def test_popularity_survives_decades_of_event_time() -> None:
    pop = Popularity(half_life_s=3600.0)
    pop.learn_one(0, 1.0, ts=0.0)
    pop.learn_one(1, 1.0, ts=20 * 365 * 86400.0)  # far past float64 range of 2**(age/half-life)
    scores = pop.scores()
    assert np.isfinite(scores).all() and scores[1] == pytest.approx(1.0) and scores[0] < 1e-100


def test_prequential_hit_rate_counts_items_already_served() -> None:
    from types import SimpleNamespace as Ev

    pipe = RefreshPipeline(Recommender(n_factors=4, seed=0, top_n=5), hit_rate_window=10)
    pipe.process([Ev(user_id="a", item_id=f"i{k}", type="click", ts=float(k), rating=None) for k in range(4)])
    served = pipe.recommender.recommend("a").items
    pipe.process([Ev(user_id="a", item_id=served[0], type="click", ts=9.0, rating=None)])
    assert pipe.hit_rate.value == pytest.approx(1 / 5)  # 4 misses (nothing served yet), then a hit
