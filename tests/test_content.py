"""Item content: cold-start ranking, explanations, interest segments, checkpoints, the encoders."""

from __future__ import annotations

import numpy as np
import pytest

from online_models.content import HashedTfidf, item_text, make_encoder
from online_models.explain import POPULAR_REASON
from online_models.recommender import Recommender
from online_models.segments import InterestSegments

CATALOGUE = {
    "hat": ("red wool hat", "Winter|Knitwear"),
    "scarf": ("red wool scarf", "Winter|Knitwear"),
    "gloves": ("wool gloves", "Winter|Knitwear"),
    "hose": ("garden hose 20m", "Garden"),
    "rake": ("garden rake", "Garden"),
    "shears": ("hedge shears", "Garden"),
}


def shop(**options: object) -> Recommender:
    rec = Recommender(n_factors=8, seed=1, **options)  # type: ignore[arg-type]
    ids = list(CATALOGUE)
    rec.add_items(ids, [CATALOGUE[i][0] for i in ids], [CATALOGUE[i][1] for i in ids])
    return rec


def test_an_untouched_item_is_ranked_from_its_text_and_explained() -> None:
    rec = shop(content_weight=5.0)
    for t, (user, item) in enumerate([("ann", "rake"), ("bob", "rake"), ("ann", "hose"), ("cy", "hat")]):
        rec.learn_one(user, item, "purchase", float(t))
    top = rec.recommend("cy", 5, explain=True)
    # Nobody touched the scarf or the gloves yet: their text puts them next to the hat cy bought
    # (the scarf first, above the popular rake; the gloves share fewer words).
    assert top.items[0] == "scarf" and "gloves" in top.items
    assert top.reasons[0] == "new, like red wool hat you bought"
    assert "hat" not in top.items  # consumed
    cold = rec.catalogue
    assert cold is not None and cold.knows(rec.items.row("scarf"))


def test_without_content_an_untouched_item_cannot_be_listed() -> None:
    rec = shop(content_encoder="off")
    rec.learn_one("cy", "hat", "purchase", 0.0)
    assert rec.recommend("cy", 5).items == []  # only the hat is known, and it is consumed
    assert rec.catalogue is None


def test_a_cold_item_starts_learning_from_its_predicted_factors() -> None:
    rec = shop(content_refresh_every=50)
    for t in range(200):  # the projection learns what knitwear looks like in factor space
        rec.learn_one(f"u{t % 7}", ["hat", "gloves"][t % 2], "click", float(t))
    scarf = rec.items.row("scarf")
    predicted = rec.mf.item_matrix()[scarf].copy()
    assert np.linalg.norm(predicted) > 0
    rec.learn_one("u0", "scarf", "click", 999.0)
    assert not rec.catalogue.warm(scarf)  # type: ignore[union-attr]  # no longer cold
    moved = rec.mf.item_matrix()[scarf]
    assert np.linalg.norm(moved - predicted) < np.linalg.norm(predicted)  # one step from, not a restart


def test_an_item_learned_before_the_catalogue_arrived_keeps_its_factors() -> None:
    """Only untouched items are cold: a catalogue published (or a title changed) after events
    must not replace learned factors with a text prediction."""
    rec = Recommender(n_factors=8, seed=1)
    for t in range(40):
        rec.learn_one(f"u{t % 5}", ["hat", "rake"][t % 2], "click", float(t))
    learned = rec.mf.item_matrix()[rec.items.row("hat")].copy()
    for title in ("red wool hat", "blue wool hat"):  # published, then its text changed
        ids = list(CATALOGUE)
        rec.add_items(ids, [title if i == "hat" else CATALOGUE[i][0] for i in ids], [None] * len(ids))
        catalogue = rec.catalogue
        assert catalogue is not None
        assert not catalogue.is_cold_row(rec.items.row("hat"))
        assert catalogue.is_cold_row(rec.items.row("scarf"))
        np.testing.assert_array_equal(rec.mf.item_matrix()[rec.items.row("hat")], learned)


def test_explanations_name_the_users_own_items_and_popularity() -> None:
    rec = shop()
    rec.learn_one("dee", "gloves", "add_to_cart", 0.0)
    rec.learn_one("eve", "rake", "view", 1.0)
    top = rec.recommend("dee", 6, explain=True)
    assert top.reasons[top.items.index("gloves")] == "it is in your cart"
    assert len(top.reasons) == len(top.items)
    assert rec.recommend("stranger", 2, explain=True).reasons == [POPULAR_REASON] * 2


def test_segments_are_named_by_what_their_members_touch() -> None:
    rec = shop(n_segments=2)
    for t in range(300):
        knit, garden = ["hat", "scarf", "gloves"][t % 3], ["hose", "rake", "shears"][t % 3]
        rec.learn_one(f"k{t % 5}", knit, "click", float(t))
        rec.learn_one(f"g{t % 5}", garden, "click", float(t))
    knitters = {tuple(rec.recommend(f"k{u}", explain=True).tags) for u in range(5)}
    gardeners = {tuple(rec.recommend(f"g{u}", explain=True).tags) for u in range(5)}
    assert all("Knitwear" in tags or "Winter" in tags or "wool" in tags for tags in knitters)
    assert all("Garden" in tags or "garden" in tags for tags in gardeners)


def test_a_segments_name_follows_what_it_learns_after_it_was_read() -> None:
    segments = InterestSegments(n_segments=1, seed=0)
    taste = np.array([1.0, 0.0])
    for _ in range(5):
        segments.learn_one(taste, ["Tea"])
    assert segments.name(taste)[1] == ["Tea"]  # read (and kept) for every list of the round
    for _ in range(10):
        segments.learn_one(taste, ["Coffee"])
    assert segments.name(taste)[1] == ["Coffee", "Tea"]


def test_a_shopper_nearest_an_unnamed_segment_gets_the_nearest_named_one() -> None:
    segments = InterestSegments(n_segments=2, seed=0)
    for _ in range(30):
        segments.learn_one(np.array([1.0, 0.0]), ["Knitwear"])
    unnamed = next(c for c in range(2) if not segments.tags(c))
    centre = segments._kmeans.centers[unnamed]
    at_unnamed = np.array([centre.get(0, 0.0), centre.get(1, 0.0)])
    assert segments.predict_one(at_unnamed) == unnamed
    assert segments.name(at_unnamed) == (1 - unnamed, ["Knitwear"])
    assert InterestSegments(n_segments=2).name(at_unnamed) == (None, [])


def test_checkpoint_keeps_catalogue_projection_and_segments() -> None:
    rec = shop(content_weight=2.0)
    for t in range(60):
        rec.learn_one(f"u{t % 4}", list(CATALOGUE)[t % 4], "click", float(t))
    again = Recommender(n_factors=8, seed=1, content_weight=2.0)
    again.restore(*rec.state())
    for user in ("u0", "u1", "u2", "u3"):
        a, b = rec.recommend(user, explain=True), again.recommend(user, explain=True)
        assert (a.items, a.scores, a.reasons, a.tags) == (b.items, b.scores, b.reasons, b.tags)
    for t in range(60, 80):  # and they go on learning identically
        for model in (rec, again):
            model.learn_one(f"u{t % 4}", list(CATALOGUE)[t % 6], "click", float(t))
    assert rec.recommend("u1").scores == again.recommend("u1").scores


def test_announcing_the_same_items_again_changes_nothing() -> None:
    rec = shop()
    ids = list(CATALOGUE)
    assert rec.add_items(ids, [CATALOGUE[i][0] for i in ids], [CATALOGUE[i][1] for i in ids]) == 0
    assert rec.add_items(["hat"], ["blue wool hat"], ["Winter|Knitwear"]) == 1  # text changed


def test_hashed_encoder_is_normalised_and_deterministic() -> None:
    a = HashedTfidf(64).encode(["wool scarf", ""])
    b = HashedTfidf(64).encode(["wool scarf", ""])
    assert np.array_equal(a, b)
    assert np.isclose(np.linalg.norm(a[0]), 1.0) and not a[1].any()
    with pytest.raises(ValueError, match="unknown content encoder"):
        make_encoder("word2vec")


def test_a_category_named_by_number_is_a_feature_of_the_hashed_encoder() -> None:
    """taobao's catalogue has no titles, only category ids: items that share one must not all
    embed to zero (then neither the text match nor the cold-item prediction has anything)."""
    same, again, other = HashedTfidf(256).encode(
        [item_text(None, c) for c in ("3738615", "3738615", "4173315")]
    )
    assert np.isclose(same @ again, 1.0) and abs(float(same @ other)) < 0.5
    # A number inside a title (a year, a size) is not a code: the title embeds as its words.
    year, words_only = HashedTfidf(256).encode(["Toy Story (1995)"]), HashedTfidf(256).encode(["Toy Story"])
    assert np.array_equal(year, words_only)


def test_a_checkpoint_from_before_codes_gets_its_coded_items_embedded_on_restore() -> None:
    rec = Recommender(n_factors=8, seed=1)
    rec.add_items(["a", "b", "c", "hat"], [None, None, None, "red wool hat"], ["111", "111", "222", "Winter"])
    rec.learn_one("ann", "c", "purchase", 0.0)  # "c" warm, "a" and "b" cold
    meta, arrays = rec.state()
    rows = [rec.items.row(item) for item in "abc"]
    hat = rec.items.row("hat")
    fresh = arrays["content_embeddings"].copy()
    old = fresh.copy()
    old[rows] = 0.0  # what the encoder made of a category id before codes were tokens
    del meta["content"]["codes"]
    restored = Recommender(n_factors=8, seed=1)
    restored.restore(meta, {**arrays, "content_embeddings": old})
    catalogue = restored.catalogue
    assert catalogue is not None
    a, b, c = catalogue.embeddings[rows]
    assert np.isclose(a @ b, 1.0) and abs(float(a @ c)) < 0.5  # the same category, another
    assert np.array_equal(catalogue.embeddings[hat], fresh[hat])  # words only: untouched
    packed, match = catalogue.match_cold(a)  # the cold items' packed copies follow
    matched = dict(zip(packed.tolist(), match.round(5).tolist(), strict=True))
    assert matched == {rows[0]: 1.0, rows[1]: 1.0, hat: 0.0}


def test_reasons_when_the_user_touched_items_the_catalogue_never_described() -> None:
    rec = shop(content_weight=5.0)
    for k in range(1100):  # the stream brings items beyond the catalogue's rows
        rec.learn_one(f"v{k % 9}", f"x{k}", "view", float(k))
    rec.learn_one("cy", "x1099", "click", 2000.0)
    rec.learn_one("cy", "hat", "purchase", 2001.0)
    top = rec.recommend("cy", 20, explain=True)
    assert "scarf" in top.items and len(top.reasons) == len(top.items)
    assert top.reasons[top.items.index("scarf")] == "new, like red wool hat you bought"


def big_shop(n_items: int = 2000, seed: int = 0) -> Recommender:
    """A catalogue of ``n_items`` titles drawn from a small vocabulary (so texts overlap)."""
    rng = np.random.default_rng(seed)
    vocab = ["red", "blue", "wool", "cotton", "hat", "scarf", "glove", "garden", "hose", "rake", "tea", "oat"]
    ids = [f"i{k}" for k in range(n_items)]
    titles = [" ".join(rng.choice(vocab, size=3, replace=False)) for _ in ids]
    rec = Recommender(n_factors=8, seed=1)
    rec.add_items(ids, titles, [None] * n_items)
    return rec


@pytest.mark.parametrize("warmed", [600, 1750])  # most items cold / few: only theirs are read
@pytest.mark.parametrize("on_top", [0, 3])
@pytest.mark.parametrize("n", [10, 50])  # the list's floor from a sample of the rows, or from all
@pytest.mark.parametrize("band", [0, 100, 1000])
def test_a_list_matches_text_only_where_it_can_change_its_top(
    band: int, n: int, on_top: int, warmed: int
) -> None:
    """The bounded text match gives the same top-n as matching every cold item. ``band`` cold
    items sit within the text weight below the list's warm floor (none, a few: matched one by
    one, most: one product), the rest far below; ``on_top`` cold items score above the floor
    before the match; the best warm items are excluded."""
    from online_models.topn import top_n

    rec = big_shop()
    content, catalogue = rec.content, rec.catalogue
    assert catalogue is not None
    rng = np.random.default_rng(1)
    for row in rng.choice(2000, size=warmed, replace=False).tolist():
        catalogue.warm(row)  # the stream touched these
    content.weight = 1.0
    cold = catalogue.cold_rows()
    band = min(band, cold.size - on_top)
    for trial in range(40):
        scores = rng.normal(size=2000 + trial % 3).astype(np.float32)  # some rows past the catalogue
        warm = np.setdiff1d(np.arange(scores.size), cold)
        ranked = warm[np.argsort(-scores[warm])]
        excluded = {*ranked[:10].tolist(), *rng.choice(2000, size=20, replace=False).tolist()}
        listed = [row for row in ranked if row not in excluded][:n]
        floor = scores[listed[-1]]
        # The warm items above the floor sit well above it: a floor taken with the excluded
        # items counted would be the (n-10)-th of them, 0.6 higher.
        scores[listed[:-1]] = floor + rng.uniform(0.6, 0.7, size=n - 1)
        scores[cold] = floor - 10.0
        near = rng.choice(cold, size=band, replace=False)
        scores[near] = floor - rng.uniform(0.0, 1.0, size=band)
        scores[rng.choice(np.setdiff1d(cold, near), size=on_top, replace=False)] = floor + 0.65
        session = [int(rng.integers(2000))]  # one item: some cold texts match it closely
        every = scores.copy()
        got = content.top_n_with_match(scores.copy(), session, n, np.array(sorted(excluded)))
        content.add_match(every, session, None)
        want = top_n(every, n, exclude=excluded)
        assert got[0].tolist() == want[0].tolist()
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_the_packed_cold_embeddings_follow_warming_and_checkpoints() -> None:
    rec = big_shop(300)
    catalogue = rec.catalogue
    assert catalogue is not None
    for row in [0, 299, 150, 7, 8, 298]:  # first, last, middle and neighbours leave the pack
        assert catalogue.warm(row)
        assert not catalogue.warm(row)
    profile = catalogue.profile([1, 2, 3])
    assert profile is not None
    rows, values = catalogue.match_cold(profile)
    assert sorted(rows.tolist()) == catalogue.cold_rows().tolist() and catalogue.n_cold == 294
    np.testing.assert_allclose(values, catalogue.embeddings[rows] @ profile, rtol=1e-5, atol=1e-7)
    restored = Recommender(n_factors=8, seed=1)
    restored.restore(*rec.state())
    again = restored.catalogue
    assert again is not None
    rows2, values2 = again.match_cold(profile)
    assert dict(zip(rows2.tolist(), values2.tolist(), strict=True)) == pytest.approx(
        dict(zip(rows.tolist(), values.tolist(), strict=True))
    )


def test_the_segments_learn_exactly_as_rivers_k_means() -> None:
    """The segments take River's k-means step in numpy: the same nearest centre at every step
    and the same centres after 3,000 taste vectors, to the last bit."""
    from river import cluster

    segments = InterestSegments(n_segments=8, seed=5)
    river = cluster.KMeans(n_clusters=8, halflife=0.02, sigma=0.1, seed=5)
    rng = np.random.default_rng(2)
    for _ in range(3000):
        vector = rng.normal(size=16) * rng.uniform(0.05, 1.0)
        nearest = river.learn_predict_one(dict(enumerate(vector.tolist())))
        assert segments.learn_one(vector, ["tea"]) == nearest
    assert segments.state()["centers"] == {
        str(c): [[k, v] for k, v in centre.items()] for c, centre in river.centers.items()
    }
