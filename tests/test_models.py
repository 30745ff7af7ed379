"""The ranker contract, the top-N helper and popularity, on the pure models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from online_models.covisit import CoVisitation
from online_models.mf import MAX_FACTOR_NORM, ImplicitMF
from online_models.pipeline import RefreshPipeline
from online_models.popularity import Popularity
from online_models.recommender import POPULARITY, Recommender
from online_models.topn import kth_floor, kth_largest, top_n
from tests.test_ranker_contract import checkerboard_log


def checkerboard(n: int, epochs: int) -> Recommender:
    rec = Recommender(n_factors=8, seed=3)
    for t, (user, item) in enumerate(checkerboard_log(n, epochs)):
        rec.learn_one(user, item, "purchase", float(t))
    return rec


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


@given(st.lists(st.floats(-1e6, 1e6) | st.just(-np.inf), min_size=1, max_size=50), st.integers(1, 60))
def test_kth_largest_is_a_full_sorts(values: list[float], k: int) -> None:
    ordered = sorted(values, reverse=True)
    kth, rows = kth_largest(np.array(values), k)
    assert kth == ordered[min(k, len(values)) - 1]
    assert rows.tolist() == [i for i, v in enumerate(values) if v >= kth]


def test_kth_largest_of_a_large_catalogue_takes_the_grouped_floor_and_stays_exact() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        scores = np.round(rng.normal(size=int(rng.integers(1024, 40_000))), 2).astype(np.float32)
        scores[rng.random(scores.size) < 0.5] = -np.inf  # cold or excluded
        k = int(rng.integers(1, 40))
        kth, rows = kth_largest(scores, k)
        assert kth == np.sort(scores)[-k]
        assert rows.tolist() == np.flatnonzero(scores >= kth).tolist()


def test_the_floor_lets_through_about_k_scores() -> None:
    """What makes the top n cheap: the floor is near the k-th largest, not a strided sample's."""
    rng = np.random.default_rng(1)
    for size in (5_000, 35_000, 200_000):
        scores = rng.normal(size=size).astype(np.float32)
        floor = kth_floor(scores, 20)
        assert floor <= np.sort(scores)[-20]
        assert int((scores >= floor).sum()) < 60


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
    assert np.isfinite(scores).all() and scores[1] == pytest.approx(1.0) and float(scores[0]) < 1e-30


def test_prequential_hit_rate_counts_items_already_served() -> None:
    from types import SimpleNamespace as Ev

    pipe = RefreshPipeline(Recommender(n_factors=4, seed=0, top_n=5), hit_rate_window=10)
    pipe.process([Ev(user_id="a", item_id=f"i{k}", type="click", ts=float(k), rating=None) for k in range(4)])
    served = pipe.recommender.recommend("a").items
    pipe.process([Ev(user_id="a", item_id=served[0], type="click", ts=9.0, rating=None)])
    assert pipe.hit_rate.value == pytest.approx(1 / 5)  # 4 misses (nothing served yet), then a hit


def test_visit_hit_rate_judges_the_list_served_when_a_visit_began(monkeypatch: pytest.MonkeyPatch) -> None:
    """The push-scenario twin: a visit after the first, with an engagement, is a hit when the
    shopper engaged with an item of the list they were served as it began; visits without an
    engagement, first visits and views on a log with clicks are not judged; a visit that ends
    without a hit (the shopper returns, or stays away past the gap) is a miss."""
    from types import SimpleNamespace as Ev

    import online_models.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "_SWEEP_EVERY", 3)
    pipe = RefreshPipeline(Recommender(n_factors=4, seed=0, top_n=5, visit_gap_s=100.0), hit_rate_window=10)

    def event(user: str, item: str, ts: float, kind: str = "click") -> Ev:
        return Ev(user_id=user, item_id=item, type=kind, ts=ts, rating=None)

    first = [event(user, f"{user}{k}", float(k)) for user in "abcde" for k in range(4)]
    pipe.process(first)  # every first visit: not judged
    served_a = pipe.recommender.recommend("a").items  # as served
    pipe.process([event("a", "new-1", 500.0, "view"), event("a", served_a[0], 501.0)])  # hit
    served_c = pipe.recommender.recommend("c").items  # as served once the clock said c had left
    pipe.process([event("c", served_c[0], 500.0)])  # a hit with the visit's first event
    pipe.process([event("b", "new-2", 500.0)])  # engaged, nothing served: a miss once it ends
    pipe.process([event("d", "new-3", 500.0, "view")])  # a view on a log with clicks: not judged
    pipe.process([event("e", "new-4", 500.0)])  # engaged, not served; never comes back
    assert pipe.visit_hit_rate.value == pytest.approx(1.0)  # b's and e's visits not over yet
    pipe.process([event("b", "new-5", 900.0)])  # b's next visit ends the last one: a miss
    assert pipe.visit_hit_rate.value == pytest.approx(2 / 3)
    # e, and b in their second visit, stay quiet past the gap: swept as misses.
    pipe.process([event("c", "c0", 2000.0, "view") for _ in range(3)])
    assert pipe.visit_hit_rate.value == pytest.approx(2 / 5)


def test_a_shopper_who_left_is_ranked_once_more_with_the_rules_at_their_away_share() -> None:
    """Once a shopper has been quiet for the visit gap on the stream's clock, the pipeline ranks
    them once more, flagged away, with the rules at ``covisit_away_share`` of their weight: at a
    share of 0, the list of the same model without rules. In a visit the rules weigh in full."""
    from pushrec.demo import SAMPLE_EVENTS
    from stream.events import decode_event
    from stream.replay import read_lines

    log = [decode_event(line) for _, line in read_lines(SAMPLE_EVENTS)][:1500]
    pipe = RefreshPipeline(Recommender(seed=0, covisit_away_share=0.0))
    plain = Recommender(seed=0, covisit_weight=0.0)  # learns the same factors, no rules
    away: dict[str, int] = {}
    events: dict[str, int] = {}
    differ = 0
    for ev in log:
        plain.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
        events[ev.user_id] = events.get(ev.user_id, 0) + 1
        for top in pipe.process([ev]):
            state = pipe.recommender.users.get(top.user_id)
            assert state is not None
            assert top.away == (pipe.recommender.clock - state.last_ts >= pipe.recommender.visit_gap_s)
            if top.away:
                assert top.items == plain.recommend(top.user_id).items, top.user_id
                assert away.get(top.user_id) != events[top.user_id]  # once per time they leave
                away[top.user_id] = events[top.user_id]
            else:
                differ += top.items != plain.recommend(top.user_id).items
    assert len(away) >= 20 and differ >= 50
    # One entry per shopper followed, not one per event: what it holds stays within the shoppers.
    assert len(pipe._by_last) == len(pipe._visiting) <= len(events)


def test_a_shopper_let_go_and_followed_again_keeps_one_entry_and_leaves_once() -> None:
    """A shopper whose partition went away (or who was forgotten) and came back within the gap is
    followed again; the entry they had before is dropped when it comes up, not moved on beside
    the new one, and they leave once."""
    from types import SimpleNamespace as Ev

    def click(user: str, item: str, ts: float) -> Ev:
        return Ev(user_id=user, item_id=item, type="click", ts=ts, rating=None)

    pipe = RefreshPipeline(Recommender(seed=0, visit_gap_s=10.0))
    pipe.learn([click("a", "i1", 100.0)])
    pipe.drop_users(["a"])  # the partition moved to another worker ...
    pipe.learn([click("a", "i2", 105.0)])  # ... and back, with a's next event
    pipe.learn([click("b", "i3", 112.0)])  # a's first entry (100) comes up; a was at 105
    assert pipe.leaving() == []
    assert len(pipe._by_last) == len(pipe._visiting) == 2  # a and b, once each
    pipe.learn([click("c", "i4", 130.0)])
    assert pipe.leaving() == ["a", "b"]


def test_top_n_grouped_floor_matches_a_full_sort() -> None:
    """Large catalogues take the grouped floor's path; the answer must equal a full sort's."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        size = int(rng.integers(1024, 300_000 if trial % 20 == 0 else 70_000))
        scores = rng.normal(size=size).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1)  # many ties
        exclude = rng.choice(size, size=int(rng.integers(0, 50)), replace=False)
        k = int(rng.integers(1, 30))
        idx, _ = top_n(scores, k, exclude)
        masked = scores.astype(np.float64)
        masked[exclude] = -np.inf
        assert idx.tolist() == np.lexsort((np.arange(size), -masked))[:k].tolist()


def test_blend_puts_the_users_own_unconsumed_items_first() -> None:
    rec = Recommender(n_factors=4, seed=0)
    for t, item in enumerate(["a", "b", "c", "d"]):
        rec.learn_one("other", item, "purchase", float(t))
    rec.learn_one("u", "z", "view", 10.0)
    rec.learn_one("u", "y", "add_to_cart", 11.0)
    rec.learn_one("u", "x", "purchase", 12.0)
    top = rec.recommend("u", 3).items
    assert top[:2] == ["y", "z"]  # cart outweighs view; x is consumed
    assert "x" not in top


def test_a_round_of_users_ranked_together_gets_the_lists_each_gets_alone() -> None:
    """A round's users are scored in one matrix product (from 8 of them on); each list is the
    one ranking that user alone gives (a score may differ in its last bit: BLAS sums the two
    products in different orders from 20k items on, so the catalogue here is that large)."""
    rng = np.random.default_rng(7)
    rec = Recommender(n_factors=16, seed=1, top_n=10)
    for t in range(24_000):
        rec.learn_one(f"u{rng.integers(60)}", f"i{t}", "click", float(t))
    users = [f"u{k}" for k in range(60)] + ["stranger"]
    together = rec.recommend_many(users, explain=True)
    for top in together:
        alone = rec.recommend(top.user_id, explain=True)
        assert (top.items, top.reasons) == (alone.items, alone.reasons)
        assert top.scores == pytest.approx(alone.scores, rel=1e-6)


def test_settings_defaults_are_the_recommenders_defaults() -> None:
    import inspect

    from infra.settings import ModelSettings

    signature = inspect.signature(Recommender).parameters
    for name, value in ModelSettings().model_dump(exclude={"hit_rate_window"}).items():
        assert value == signature[name].default or dict(signature[name].default) == value, name


def test_one_absurd_rating_does_not_poison_every_list() -> None:
    """Regression (issue 19, item 6): 50 clicks, one rating of 1e300, 30 more clicks made every
    user's scores ~1e19-1e21 and the rated item's popularity inf."""
    rec = Recommender(seed=0)
    rng = np.random.default_rng(0)
    for t in range(50):
        rec.learn_one(f"u{t % 7}", f"i{rng.integers(30)}", "click", float(t))
    rec.learn_one("u1", "i3", "rating", 50.0, rating=1e300)
    for t in range(51, 81):
        rec.learn_one(f"u{t % 7}", f"i{rng.integers(30)}", "click", float(t))
    assert np.isfinite(rec.popularity.scores()).all()
    for user in [*(f"u{k}" for k in range(7)), "stranger"]:
        scores = rec.recommend(user).scores
        assert scores and all(math.isfinite(s) and abs(s) < 1e3 for s in scores), (user, scores[:3])
    assert float(np.abs(rec.mf.item_matrix()).max()) < 10


def test_an_update_that_would_explode_the_factors_is_refused_and_counted() -> None:
    mf = ImplicitMF(n_factors=4, seed=0)
    mf.learn_one("u", "a", 1.0, ["b"])
    users, items = mf._mf.u_latents, mf._mf.i_latents
    before = (users["u"].copy(), items["a"].copy(), items["b"].copy(), mf.item_matrix().copy())
    for weight in (1e300, math.nan, math.inf, -1.0):
        assert mf.learn_one("u", "a", weight, ["b"]) is False
    assert mf.refused == 4
    np.testing.assert_array_equal(users["u"], before[0])
    np.testing.assert_array_equal(items["a"], before[1])
    np.testing.assert_array_equal(mf.item_matrix(), before[3])

    diverging = ImplicitMF(n_factors=4, learning_rate=1e6, seed=0)  # every step overshoots
    for step in range(20):
        diverging.learn_one(f"u{step % 3}", f"i{step % 5}", 1.0, [f"i{(step + 1) % 5}"])
    assert diverging.refused > 0
    vectors = [*diverging._mf.u_latents.values(), *diverging._mf.i_latents.values()]
    assert all(np.isfinite(v).all() and np.linalg.norm(v) <= MAX_FACTOR_NORM for v in vectors)
    assert np.isfinite(diverging.item_matrix()).all()
    assert "u-new" not in diverging and diverging.learn_one("u-new", "i-new", 1.0) is False
    assert "u-new" not in diverging and "i-new" not in diverging._mf.i_latents  # undone whole


@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),
            st.integers(0, 9),
            st.sampled_from(["view", "click", "add_to_cart", "purchase", "rating"]),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_learning_keeps_every_score_finite(events: list[tuple[int, int, str, float]]) -> None:
    rec = Recommender(n_factors=4, seed=0, top_n=5)
    for t, (user, item, kind, rating) in enumerate(events):
        rec.learn_one(f"u{user}", f"i{item}", kind, float(t), rating=rating if kind == "rating" else None)
    for user in range(5):
        assert all(math.isfinite(s) for s in rec.recommend(f"u{user}").scores)


def test_user_state_is_compact_and_reads_older_checkpoints() -> None:
    from online_models.user_state import UserState

    state = UserState()
    for t, (row, kind) in enumerate([(5, "view"), (6, "click"), (5, "add_to_cart")]):
        state.touch(row, kind, float(t), consuming=False, session_items=2)
        state.remember(row, kind, 0.5, float(t), half_life_s=10.0, memory=100)
    assert state.session == [6, 5] and not hasattr(state, "__dict__")
    assert state.kinds == {6: "click", 5: "add_to_cart"}
    assert isinstance(state.consumed, frozenset)  # no set until something is consumed
    rows, own = state.interest_scores(weight=1.0, half_life_s=10.0)
    by_row = dict(zip(rows.tolist(), own.tolist(), strict=True))
    assert by_row[5] == pytest.approx(0.5 * 2 ** (-2 / 10) + 0.5)  # both touches, decayed to t=2
    again = UserState.from_json(state.to_json(), session_items=2, half_life_s=10.0)
    assert again == state
    # The explanation of an own item names what was last done to it, in the session or not.
    state.touch(7, "view", 3.0, consuming=False, session_items=2)
    state.touch(8, "view", 4.0, consuming=False, session_items=2)
    assert state.history(np.array([5, 9])).own == {5: "add_to_cart"}
    # A checkpoint of 2026-12-01 kept [row, level]; the kind came from the session.
    day_old = UserState.from_json([3, 2.0, [], [[5, 1.0]], [5], [[5, "click"]]], 2, half_life_s=10.0)
    assert day_old.history(np.array([5])).own == {5: "click"}
    # A checkpoint written before interest was kept as one level: [row, weight, seen].
    old = UserState.from_json([3, 2.0, [], [[5, 0.8, 2.0]], [5], [[5, "view"]]], 2, half_life_s=10.0)
    assert dict(zip(*map(np.ndarray.tolist, old.interest_scores(1.0, 10.0)), strict=True)) == {
        5: pytest.approx(0.8)
    }


def coffee_and_sofa_shop() -> tuple[Recommender, float]:
    """Ten shoppers: each buys coffee twice and a sofa once. The model, and the last event time."""
    rec = Recommender(n_factors=4, seed=0)
    t = 0.0
    for n in range(10):
        for item in ("coffee", "sofa", "coffee", f"filler{n}"):
            t += 60.0
            rec.learn_one(f"s{n}", item, "purchase", ts=t)
    return rec, t


def test_a_bought_item_comes_back_when_shoppers_buy_it_again() -> None:
    """Coffee: every shopper buys it twice. Sofa: bought once each. A shopper who bought both
    once gets coffee back ("time to restock"), never the sofa."""
    rec, t = coffee_and_sofa_shop()
    rec.learn_one("me", "coffee", "purchase", ts=t + 60)
    rec.learn_one("me", "sofa", "purchase", ts=t + 120)
    rec.learn_one("me", "filler0", "view", ts=t + 180)
    top = rec.recommend("me", 5, explain=True)
    assert "coffee" in top.items and "sofa" not in top.items
    assert top.reasons[top.items.index("coffee")] == "time to restock coffee?"
    rec.rebuy_weight = 0.0  # off: consumed items never come back
    assert "coffee" not in rec.recommend("me", 5).items


def test_every_consumed_item_stays_off_the_list_but_those_bought_again() -> None:
    """What a list leaves out is what the shopper bought or rated, less what comes back: for a
    shopper who only bought (taken from their purchases) and for one who also rated."""
    rec, t = coffee_and_sofa_shop()
    for shopper in ("buyer", "rater"):
        for item in ("coffee", "sofa"):
            t += 60.0
            rec.learn_one(shopper, item, "purchase", ts=t)
    rec.learn_one("rater", "filler2", "rating", ts=t + 60.0, rating=5.0)
    row = rec.items.row
    for shopper, out in (("buyer", {"sofa"}), ("rater", {"sofa", "filler2"})):
        state = rec.users.get(shopper)
        assert state is not None
        assert set(rec._related(state).excluded(state.consumed).tolist()) == {row(item) for item in out}
        top = rec.recommend(shopper, 20)
        assert "coffee" in top.items and not out & set(top.items)


def test_a_shopper_who_rebuys_an_item_gets_it_back_though_most_buy_it_once() -> None:
    """Sixty shoppers buy tea once; tea's repeat share (~0.03) is under the 0.05 floor. A shopper
    who bought it three times has their own chance, (2 + share) / 3, of buying it again: it
    comes back for them, and not for a shopper who bought it once."""
    rec = Recommender(n_factors=4, seed=0)
    t = 0.0
    for n in range(60):
        for item in ("tea", f"filler{n}"):
            t += 60.0
            rec.learn_one(f"s{n}", item, "purchase", ts=t)
    for shopper, times in (("loyal", 3), ("once", 1)):
        for _ in range(times):
            t += 60.0
            rec.learn_one(shopper, "tea", "purchase", ts=t)
        rec.learn_one(shopper, "filler0", "view", ts=t + 30.0)
    assert rec.rebuy.shares(np.array([rec.items.row("tea")]))[0] < rec.rebuy.min_share
    loyal = rec.recommend("loyal", 5, explain=True)
    assert "tea" in loyal.items
    assert loyal.reasons[loyal.items.index("tea")] == "time to restock tea?"
    assert "tea" not in rec.recommend("once", 5).items


@given(st.lists(st.integers(0, 300), max_size=700))
def test_a_shoppers_purchases_are_counted_per_item_short_or_long(rows: list[int]) -> None:
    """``buy`` tells a repeat from a first purchase and counts up to 255, for a shopper of a few
    items or of hundreds."""
    from collections import Counter

    from online_models.user_state import UserState

    state, seen = UserState(), Counter[int]()
    for row in [*rows, *range(150), *rows, *[7] * 300]:  # at least 150 items, and 255 buys of one
        assert state.buy(row) == (row in seen)
        seen[row] += 1
    bought, counts = state.purchases()
    want = {row: min(count, 255) for row, count in seen.items()}
    assert dict(zip(bought.tolist(), counts.tolist(), strict=True)) == want


def test_a_new_item_borrows_its_categorys_rebuy_share() -> None:
    """Coffee is bought again by every shopper, sofas never. A shopper who buys a coffee and a
    sofa nobody bought before gets the coffee back, not the sofa: each borrows its category's
    share. Without a catalogue both borrow the shop's and come back. Restored, the same."""
    rec = Recommender(n_factors=4, seed=0)
    items = ["coffee", "new coffee", "sofa", "new sofa"] + [f"filler{n}" for n in range(10)]
    categories = ["coffee", "coffee", "furniture", "furniture"] + [None] * 10
    rec.add_items(items, [None] * len(items), categories)  # type: ignore[arg-type]
    without = Recommender(n_factors=4, seed=0)
    t = 0.0
    for n in range(10):
        for item in ("coffee", "sofa", "coffee", f"filler{n}"):
            t += 60.0
            for model in (rec, without):
                model.learn_one(f"s{n}", item, "purchase", ts=t)
    for model in (rec, without):
        model.learn_one("me", "new coffee", "purchase", ts=t + 60)
        model.learn_one("me", "new sofa", "purchase", ts=t + 120)
        model.learn_one("me", "filler0", "view", ts=t + 180)
    listed = rec.recommend("me", 8).items
    assert "new coffee" in listed and "new sofa" not in listed
    assert {"new coffee", "new sofa"} <= set(without.recommend("me", 8).items)
    restored = Recommender(n_factors=4, seed=0)
    restored.restore_items(*rec.item_state())
    rows = np.array([rec.items.row("new coffee"), rec.items.row("new sofa")])
    assert restored.rebuy.shares(rows) == pytest.approx(rec.rebuy.shares(rows))


def test_a_rules_reason_names_the_last_item_that_added_most_the_nearest_on_a_tie() -> None:
    rules = CoVisitation(window=3, neighbours=10, half_life_s=1e9)
    for previous in ([1], [2], [2]):  # 1 -> 3 once, 2 -> 3 twice
        rules.learn_one(previous, 3, weight=1.0, ts=0.0)
    rules.learn_one([1], 4, weight=1.0, ts=0.0)
    assert rules.sources([1, 2], [3, 4]) == [2, 1]  # 3: 2/1 from 2 against 1/2 from 1
    assert rules.sources([2, 1], [3]) == [1]  # 2/2 from 2 and 1/1 from 1: the nearest, 1
    assert rules.sources([5], [3]) == [-1]  # no rule from the last items


def test_items_that_follow_the_last_one_are_listed_with_their_reason() -> None:
    """Shoppers who view the kettle go on to the teapot; a new shopper viewing the kettle gets
    the teapot, "viewed together with kettle"."""
    rec = Recommender(n_factors=4, seed=0, popularity_weight=0.0)
    t = 0.0
    for n in range(8):
        for item in ("kettle", "teapot", f"other{n}"):
            t += 60.0
            rec.learn_one(f"s{n}", item, "view", ts=t)
    rec.learn_one("me", "kettle", "view", ts=t + 60)
    top = rec.recommend("me", 3, explain=True)
    assert top.items[:2] == ["kettle", "teapot"]  # own interest first, then what follows it
    assert top.reasons[1] == "viewed together with kettle"


def test_a_list_reads_the_rules_and_repeat_counts_learned_since_the_last_one() -> None:
    """A shopper's rule candidates and returning purchases are kept from one list to the next
    (a replay ranks a shopper, then learns their event), never past a change: rules other
    shoppers teach, repeat purchases, and a restored item state all show in the next list."""

    def me() -> Recommender:
        rec = Recommender(n_factors=4, seed=0, popularity_weight=0.0)
        rec.learn_one("me", "coffee", "purchase", ts=60.0)
        rec.learn_one("me", "kettle", "view", ts=120.0)
        return rec

    def reason(rec: Recommender, item: str) -> str | None:
        top = rec.recommend("me", 5, explain=True)
        return top.reasons[top.items.index(item)] if item in top.items else None

    rec, stale = me(), me()
    assert reason(rec, "teapot") is None and reason(rec, "coffee") is None
    for n in range(3):  # rules only (views): kettle -> teapot
        rec.learn_one(f"s{n}", "kettle", "view", ts=200.0 + n)
        rec.learn_one(f"s{n}", "teapot", "view", ts=210.0 + n)
    assert reason(rec, "teapot") == "viewed together with kettle"
    assert reason(rec, "coffee") is None
    for n in range(3):  # repeat purchases only: no rule from an item to itself
        rec.learn_one(f"t{n}", "coffee", "purchase", ts=300.0 + n)
        rec.learn_one(f"t{n}", "coffee", "purchase", ts=310.0 + n)
    assert reason(rec, "coffee") == "time to restock coffee?"
    assert reason(stale, "teapot") is None and reason(stale, "coffee") is None
    stale.restore_items(*rec.item_state())
    assert reason(stale, "teapot") == "viewed together with kettle"
    assert reason(stale, "coffee") == "time to restock coffee?"
