"""Item state merged across shards (the scale-out protocol, in process): additive, complete,
deterministic; and the partitioner that splits users is Kafka's."""

from __future__ import annotations

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from online_models.item_sync import ShardedRecommender
from online_models.recommender import Recommender
from pushrec.demo import SAMPLE_EVENTS
from stream.events import decode_event
from stream.replay import read_lines
from stream.topics import partition_of
from tests.conftest import Hermetic
from tests.test_cli import pushrec

USERS = {"alice": 0, "bob": 1}


def two_shards(sync_s: float | None) -> ShardedRecommender:
    return ShardedRecommender([Recommender(n_factors=4, seed=0) for _ in range(2)], USERS.__getitem__, sync_s)


def test_a_merge_adds_every_shards_changes_to_an_item() -> None:
    sharded = two_shards(sync_s=10.0)
    a, b = sharded.shards
    for t in range(3):  # both shards learn the same item from their own users in one interval
        sharded.learn_one("alice", "scarf", "click", float(t))
        sharded.learn_one("bob", "scarf", "purchase", float(t))
    start = a.mf.initial_vector("scarf")
    np.testing.assert_array_equal(start, b.mf.initial_vector("scarf"))  # the same start everywhere
    delta_a = a.mf._mf.i_latents["scarf"] - start
    delta_b = b.mf._mf.i_latents["scarf"] - start
    sharded.learn_one("alice", "hat", "view", 20.0)  # past the interval: merge first
    assert sharded.merges == 1
    for shard in (a, b):
        merged = shard.mf._mf.i_latents["scarf"]
        np.testing.assert_allclose(merged, start + delta_a + delta_b)
        row = shard.items.row("scarf")
        np.testing.assert_allclose(shard.mf.item_matrix()[row], merged.astype(np.float32))
    # Popularity: each shard counts the other's events, once.
    scarf_a = a.popularity.scores()[a.items.row("scarf")]
    scarf_b = b.popularity.scores()[b.items.row("scarf")]
    # (a has seen a later event, so its counts are decayed 18 s further: a day's half-life)
    assert scarf_a == pytest.approx(scarf_b, rel=1e-3)
    assert scarf_a == pytest.approx(3 * 0.5 + 3 * 1.0, rel=1e-3)


def test_every_shard_holds_every_item_after_a_merge_and_none_before_without_one() -> None:
    merging, apart = two_shards(sync_s=1.0), two_shards(sync_s=None)
    for sharded in (merging, apart):
        sharded.learn_one("alice", "only-alice", "click", 0.0)
        sharded.learn_one("bob", "only-bob", "click", 0.5)
        sharded.learn_one("bob", "later", "click", 5.0)
    assert "only-alice" in merging.shards[1].mf._mf.i_latents
    assert "only-bob" in merging.shards[0].mf._mf.i_latents
    assert "only-alice" not in apart.shards[1].items and apart.merges == 0


def test_sharded_evaluation_is_deterministic() -> None:
    events = [decode_event(line) for _, line in read_lines(SAMPLE_EVENTS)][:1500]

    def lists() -> list[list[str]]:
        shards = [Recommender(n_factors=8, seed=1) for _ in range(3)]
        sharded = ShardedRecommender(shards, lambda user: partition_of(user, 3), sync_s=3600.0)
        for ev in events:
            sharded.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
        assert sharded.merges > 1
        return [sharded.recommend(user).items for user in sorted({ev.user_id for ev in events})]

    assert lists() == lists()


def test_evaluate_workers_adds_the_sharded_row() -> None:
    result = pushrec("evaluate", str(SAMPLE_EVENTS), "--workers", "3", "--sync-s", "never", "--json")
    assert result.returncode == 0, result.stderr
    assert "pushrec-3-workers" in result.stdout
    bad = pushrec("evaluate", str(SAMPLE_EVENTS), "--workers", "3", "--sync-s", "soon")
    assert bad.returncode == 2 and "never" in bad.stderr


@pytest.mark.integration
def test_partition_of_is_where_the_broker_puts_a_users_events(hermetic: Hermetic) -> None:
    from infra.kafka import KafkaAccess
    from stream.topics import ensure_topics

    topic = f"{hermetic.prefix}.partitioning"
    ensure_topics(KafkaAccess(hermetic.servers.kafka_bootstrap), [topic], partitions=4)
    users = [f"user-{k}" for k in range(40)]
    producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
    for user in users:
        producer.send(topic, key=user.encode(), value=b"{}")
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=hermetic.servers.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        enable_auto_commit=False,
    )
    placed = {m.key.decode(): m.partition for m in consumer}
    consumer.close()
    assert placed == {user: partition_of(user, 4) for user in users}
    assert len(set(placed.values())) == 4


def test_discarded_changes_leave_the_item_state_as_before() -> None:
    """What a worker re-learns after a crash without its item effects (the group holds them):
    factors, popularity, rules and repeat-purchase counts as if only the kept events were learned."""
    from online_models.item_sync import discard_changes, track_changes

    def learn(rec: Recommender, events: list[tuple[str, str, str]]) -> None:
        for t, (user, item, kind) in enumerate(events):
            rec.learn_one(user, item, kind, ts=float(t))

    kept = [("a", "x", "view"), ("a", "y", "purchase"), ("b", "x", "purchase"), ("b", "y", "purchase")]
    again = [("b", "y", "purchase"), ("a", "z", "view"), ("c", "x", "click")]
    only, both = Recommender(n_factors=4, seed=0), Recommender(n_factors=4, seed=0)
    learn(only, kept)
    learn(both, kept)
    track_changes(both)
    both.mf.take_item_changes(), both.popularity.take_counts(), both.covisit.take_changes()
    both.rebuy.take_changes()
    learn(both, again)
    discard_changes(both)
    for item in ("x", "y"):
        np.testing.assert_allclose(
            both.mf.item_matrix()[both.items.row(item)],
            only.mf.item_matrix()[only.items.row(item)],
            rtol=1e-6,
        )
        row = only.items.row(item)
        assert both.covisit.scores([row])[0].tolist() == only.covisit.scores([row])[0].tolist()
        assert both.rebuy.shares(np.array([row])) == pytest.approx(only.rebuy.shares(np.array([row])))
    assert both.popularity.scores()[:2] == pytest.approx(only.popularity.scores()[:2])


def test_rules_and_interest_survive_a_checkpoint_round_trip() -> None:
    """The compact forms (rules as arrays per source, interest as pairs) restore exactly, empty
    or not."""
    from infra.checkpoint import pack, unpack

    empty, fresh = Recommender(n_factors=4, seed=0), Recommender(n_factors=4, seed=0)
    fresh.restore(*unpack(pack(*empty.state())))
    assert len(fresh.covisit) == 0
    learned = Recommender(n_factors=4, seed=0)
    for t, (user, item, kind) in enumerate(
        [
            ("a", "x", "view"),
            ("a", "y", "click"),
            ("a", "z", "purchase"),
            ("b", "y", "click"),
            ("b", "x", "click"),
        ]
    ):
        learned.learn_one(user, item, kind, ts=float(t))
    restored = Recommender(n_factors=4, seed=0)
    restored.restore(*unpack(pack(*learned.state())))
    for item in ("x", "y", "z"):
        row = learned.items.row(item)
        got, want = restored.covisit.scores([row]), learned.covisit.scores([row])
        assert [a.tolist() for a in got] == [a.tolist() for a in want]
    for user in ("a", "b"):
        got = restored.users.get(user).interest_scores(1.0, 86_400.0)
        want = learned.users.get(user).interest_scores(1.0, 86_400.0)
        assert [a.tolist() for a in got] == [a.tolist() for a in want]
    assert restored.recommend("a").items == learned.recommend("a").items


SHOP = {
    "hat": "red wool hat",
    "scarf": "red wool scarf",
    "gloves": "wool gloves",
    "rake": "garden rake",
    "hose": "garden hose",
    "beanie": "red wool beanie",  # (nobody touches these four: cold throughout)
    "mittens": "wool mittens",
    "socks": "wool socks",
    "trowel": "garden trowel",
}


def _with_catalogue(rec: Recommender) -> Recommender:
    rec.add_items(list(SHOP), list(SHOP.values()), [None] * len(SHOP))
    return rec


def _cold(rec: Recommender, item: str) -> bool:
    catalogue = rec.catalogue
    assert catalogue is not None
    return catalogue.is_cold_row(rec.items.row(item))


def test_an_item_learned_from_its_text_elsewhere_starts_here_where_it_started_there() -> None:
    """The live protocol with a catalogue: a worker learns a cold item from its own prediction;
    another worker, where the item is still cold, holds the same factors after the record and
    counts it as learned (no text match, no re-prediction over it)."""
    from online_models.item_sync import add_changes, take_changes, track_changes

    a = _with_catalogue(Recommender(n_factors=4, seed=0, content_refresh_every=5))
    b = _with_catalogue(Recommender(n_factors=4, seed=0, content_refresh_every=5))
    for t in range(30):  # a's text-to-factors map learns; b's does not
        a.learn_one(f"u{t % 3}", ["hat", "rake"][t % 2], "click", float(t))
    track_changes(a), track_changes(b)
    assert _cold(a, "scarf") and _cold(b, "scarf")
    a.learn_one("u0", "scarf", "click", 40.0)  # starts from a's prediction
    change = take_changes(a)
    add_changes(b, change)
    assert not _cold(b, "scarf")
    mine, theirs = a.mf._mf.i_latents["scarf"], b.mf._mf.i_latents["scarf"]
    np.testing.assert_allclose(theirs, mine)
    b.content._predict_cold()  # a refresh re-predicts cold rows only
    np.testing.assert_allclose(b.mf.item_matrix()[b.items.row("scarf")], mine.astype(np.float32))


def test_a_merge_starts_an_item_learned_from_its_text_where_its_shard_started_it() -> None:
    sharded = ShardedRecommender(
        [Recommender(n_factors=4, seed=0, content_refresh_every=5) for _ in range(2)],
        USERS.__getitem__,
        sync_s=10.0,
    )
    assert sharded.add_items(list(SHOP), list(SHOP.values()), [None] * len(SHOP)) == len(SHOP)
    a, b = sharded.shards
    for t in range(30):
        sharded.learn_one("alice", ["hat", "rake"][t % 2], "click", t / 10)
    sharded.learn_one("alice", "scarf", "click", 5.0)  # cold in both: a starts it from its text
    predicted = a.mf._base["scarf"].copy()  # type: ignore[index]
    learned = a.mf._mf.i_latents["scarf"].copy()
    sharded.learn_one("bob", "hose", "view", 20.0)  # past the interval: merge first
    assert sharded.merges >= 1 and not np.allclose(predicted, a.mf.initial_vector("scarf"))
    for shard in (a, b):
        np.testing.assert_allclose(shard.mf._mf.i_latents["scarf"], learned)
        assert not _cold(shard, "scarf")


def test_the_text_model_is_learned_by_the_group() -> None:
    """The catalogue's text-to-factors map and text weight are item-side too: another worker's
    changes add to them (live protocol), and discarded changes leave them as before."""
    from online_models.item_sync import add_changes, discard_changes, take_changes, track_changes

    a = _with_catalogue(Recommender(n_factors=4, seed=0, content_weight=1.0))
    b = _with_catalogue(Recommender(n_factors=4, seed=0, content_weight=1.0))
    track_changes(a), track_changes(b)
    for t in range(60):  # each shopper new to the items (else the text weight has no step)
        a.learn_one(f"u{t // 3}", ["hat", "rake", "scarf"][t % 3], "click", float(t))
        b.learn_one(f"v{t // 2}", ["gloves", "hose"][t % 2], "click", float(t))
    text_a, text_b = (rec.catalogue.projection.weights.copy() for rec in (a, b))  # type: ignore[union-attr]
    start = np.zeros_like(text_a)  # both maps start at zero
    assert (text_a != start).any() and a.content.weight != 1.0
    weight_a, weight_b = a.content.weight, b.content.weight
    from_a, from_b = take_changes(a), take_changes(b)
    add_changes(b, from_a)
    add_changes(a, from_b)
    for rec in (a, b):  # one map: each holds both workers' learning
        np.testing.assert_allclose(rec.catalogue.projection.weights, text_a + text_b - start, atol=1e-6)  # type: ignore[union-attr]
        assert rec.content.weight == pytest.approx(weight_a + weight_b - 1.0)
    late = Recommender(n_factors=4, seed=0, content_weight=1.0)  # its catalogue comes after
    track_changes(late)
    add_changes(late, from_a)
    add_changes(late, from_b)
    _with_catalogue(late)
    np.testing.assert_allclose(late.catalogue.projection.weights, a.catalogue.projection.weights, atol=1e-6)  # type: ignore[union-attr]
    assert late.content.weight == pytest.approx(a.content.weight)
    assert not take_changes(late)  # the early changes are not its own
    held = b.catalogue.projection.weights.copy()  # type: ignore[union-attr]
    for t in range(10):  # learned again after a crash: the group holds these already
        b.learn_one(f"v{t % 3}", "gloves", "click", 100.0 + t)
    discard_changes(b)
    np.testing.assert_array_equal(b.catalogue.projection.weights, held)  # type: ignore[union-attr]
    assert not take_changes(b)  # nothing of its own left to publish


def test_a_record_from_before_the_starts_and_the_text_model_still_applies() -> None:
    """A worker of the previous version publishes no ``starts`` and no text model: its records
    add up as before (an item new here starts from its initial vector)."""
    from online_models.item_sync import ItemChanges, add_changes, take_changes, track_changes

    a, b = Recommender(n_factors=4, seed=0), Recommender(n_factors=4, seed=0)
    track_changes(a)
    a.learn_one("u", "x", "click", 0.0)
    change = take_changes(a)
    old = {
        k: v
        for k, v in change.arrays().items()
        if k not in {"starts", "starts_at", "projection", "content_weight"}
    }
    add_changes(b, ItemChanges.from_parts(change.ids, change.rules_t_ref, old))
    np.testing.assert_allclose(b.mf.item_matrix()[b.items.row("x")], a.mf.item_matrix()[a.items.row("x")])


def test_a_worker_without_a_catalogue_reads_the_groups_text_weight_again_after_a_restore() -> None:
    """A checkpoint taken before this worker's first items holds no text weight. The group's
    records after it are read again on restore, so the weight starts again from its first value
    and those records count once, not twice."""
    from online_models.item_sync import add_changes, take_changes, track_changes

    a = _with_catalogue(Recommender(n_factors=4, seed=0, content_weight=1.0))
    track_changes(a)
    for t in range(30):
        a.learn_one(f"u{t // 3}", ["hat", "rake", "scarf"][t % 3], "click", float(t))
    from_a = take_changes(a)
    step = float(from_a.content_weight[0])
    assert step != 0.0
    b = Recommender(n_factors=4, seed=0, content_weight=1.0)  # no catalogue yet
    track_changes(b)
    meta, arrays = b.item_state()  # its checkpoint, before the record
    add_changes(b, from_a)
    assert b.content.weight == pytest.approx(1.0 + step)
    b.restore_items(meta, arrays)  # a crash: back to the checkpoint, and the record read again
    add_changes(b, from_a)
    assert b.content.weight == pytest.approx(1.0 + step)
