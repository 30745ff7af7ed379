"""One item state for the group over the real broker (``consumers.item_exchange``): an item only
worker A's users touched reaches worker B with A's factors and counts; a worker that takes a
crashed worker's partition counts every event's item changes once."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.worker import RefreshWorker, build_recommender
from infra.kafka import KafkaAccess
from online_models.recommender import Recommender
from stream.events import decode_event
from stream.records import Record
from stream.topics import TopicNames, ensure_topics, partition_of
from tests.conftest import Hermetic, dataset
from tests.test_catch_up import commit
from tests.test_pipeline_e2e import head

pytestmark = pytest.mark.integration

PARTITIONS = 2


def real_events(hermetic: Hermetic, n: int) -> list[bytes]:
    """The first ``n`` events of the taobao log."""
    return head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", n).read_bytes().splitlines()


def records(names: TopicNames, lines: list[bytes], partition: int) -> list[Record]:
    """The events as records of partition ``partition`` of their type's topic (fresh topics)."""
    out, offsets = [], Counter[str]()
    for line in lines:
        event = decode_event(line)
        topic = names.events(event.type)
        out.append(Record(topic, partition, offsets[topic], event.user_id.encode(), line, event.ts))
        offsets[topic] += 1
    return out


def worker(hermetic: Hermetic) -> RefreshWorker:
    settings = hermetic.settings(PUSHREC_KAFKA__PARTITIONS=str(PARTITIONS))
    kafka = KafkaAccess(hermetic.servers.kafka_bootstrap)
    ensure_topics(kafka, TopicNames(hermetic.prefix).all, PARTITIONS)
    return RefreshWorker(settings, kafka, hermetic.servers.redis_url)


def item_factors(recommender: Recommender) -> dict[str, np.ndarray]:
    matrix = recommender.mf.item_matrix()
    return {item: matrix[row] for row, item in enumerate(recommender.items.ids)}


def popularity(recommender: Recommender) -> dict[str, float]:
    scores = recommender.popularity.scores()
    return {item: float(scores[row]) for row, item in enumerate(recommender.items.ids) if row < scores.size}


def produce(hermetic: Hermetic, recs: list[Record]) -> None:
    """Put the records of partition 0 in the log at their offsets (fresh topics)."""
    producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
    for record in recs:
        assert (
            producer.send(record.topic, key=record.key, value=record.value, partition=0).get(30).offset
            == record.offset
        )
    producer.close()


def commit_all(hermetic: Hermetic, group_of: RefreshWorker, recs: list[Record]) -> None:
    """Commit the records of partition 0 for the group (what Faust had read when the worker died)."""
    for topic, end in Counter(record.topic for record in recs).items():
        commit(
            hermetic.servers.kafka_bootstrap,
            group_of.settings.kafka.consumer_group,
            TopicPartition(topic, 0),
            end,
        )


def learned_once(like: RefreshWorker, lines: list[bytes]) -> dict[str, float]:
    """Each item's popularity in one model that learned every event once."""
    reference = build_recommender(like.settings)
    for line in lines:
        event = decode_event(line)
        reference.learn_one(event.user_id, event.item_id, event.type, event.ts, event.rating)
    return popularity(reference)


def taobao_catalogue(items: set[str]) -> tuple[list[str], list[str | None], list[str | None]]:
    """The taobao catalogue's rows for ``items`` (a category id each, no title)."""
    import gzip

    with gzip.open(dataset("taobao/items.jsonl.gz")) as lines:
        rows = [row for row in map(orjson.loads, lines) if row["item_id"] in items]
    return [row["item_id"] for row in rows], [None] * len(rows), [row["category"] for row in rows]


@pytest.mark.parametrize("with_catalogue", [False, True])
def test_an_item_only_one_workers_users_touched_reaches_the_other(
    hermetic: Hermetic, with_catalogue: bool
) -> None:
    """With a catalogue, A starts a cold item from its text prediction: B, where the item is
    still cold, starts it there too (the record carries the start) and counts it as learned."""
    names = TopicNames(hermetic.prefix)
    lines = real_events(hermetic, 400)
    by_partition: dict[int, list[bytes]] = {0: [], 1: []}
    for line in lines:
        by_partition[partition_of(decode_event(line).user_id, PARTITIONS)].append(line)
    items_of = {p: {decode_event(line).item_id for line in chunk} for p, chunk in by_partition.items()}
    only_a = items_of[0] - items_of[1]
    assert only_a and by_partition[1]
    catalogue = taobao_catalogue(items_of[0] | items_of[1]) if with_catalogue else None

    async def scenario() -> tuple[Recommender, Recommender, float]:
        a, b = worker(hermetic), worker(hermetic)
        try:
            a.ownership.owned, b.ownership.owned = {0}, {1}
            if catalogue is not None:
                a.pipeline.recommender.add_items(*catalogue)
                b.pipeline.recommender.add_items(*catalogue)
            await a.handle_records(records(names, by_partition[0], 0))
            await b.handle_records(records(names, by_partition[1], 1))
            assert not any(map(b.pipeline.recommender.mf.has_factors, only_a))
            await a.exchange.publish()
            await b.exchange.publish()
            await a.exchange.read_to_end()
            await b.exchange.read_to_end()
            lag = b.metrics.item_state_lag._value.get()
            return a.pipeline.recommender, b.pipeline.recommender, lag
        finally:
            await a.close()
            await b.close()

    a, b, lag = asyncio.run(scenario())
    factors_a, factors_b = item_factors(a), item_factors(b)
    pop_a, pop_b = popularity(a), popularity(b)
    assert only_a <= set(factors_b)
    if catalogue is not None:  # learned in A from their text, learned in B: none cold
        assert a.catalogue is not None and b.catalogue is not None
        started = [item for item in only_a if a.catalogue.knows(a.items.row(item))]
        assert len(started) > len(only_a) // 2
        assert not b.catalogue.is_cold(np.array([b.items.row(item) for item in only_a])).any()
        # One text model: each worker's map and weight hold both workers' learning.
        assert a.catalogue.projection.weights.any()
        np.testing.assert_allclose(b.catalogue.projection.weights, a.catalogue.projection.weights, atol=1e-6)
        assert b.content.weight == pytest.approx(a.content.weight)
    for item in only_a:  # A's factors and counts, in B
        np.testing.assert_allclose(factors_b[item], factors_a[item], rtol=1e-5, atol=1e-7)
        assert pop_b[item] == pytest.approx(pop_a[item], rel=1e-5) and pop_b[item] > 0
    # One item state: every item, the same factors and counts in both.
    assert set(factors_a) == set(factors_b)
    for item in factors_a:
        np.testing.assert_allclose(factors_b[item], factors_a[item], rtol=1e-5, atol=1e-7)
        assert pop_b[item] == pytest.approx(pop_a[item], rel=1e-5, abs=1e-9)
    assert 0 < lag < 60  # A's changes were seconds old when B applied them
    # The sequential rules and the repeat-purchase counts too: from an item only A's users
    # touched, B proposes what A proposes.
    compared = 0
    for item in only_a:
        rows_a, scores_a = a.covisit.scores([a.items.row(item)])
        rows_b, scores_b = b.covisit.scores([b.items.row(item)])
        got_a = {a.items.ids[r]: v for r, v in zip(rows_a.tolist(), scores_a.tolist(), strict=True)}
        got_b = {b.items.ids[r]: v for r, v in zip(rows_b.tolist(), scores_b.tolist(), strict=True)}
        assert got_a.keys() == got_b.keys()
        assert all(got_b[k] == pytest.approx(v, rel=1e-6) for k, v in got_a.items())
        compared += bool(got_a)
        share_a = a.rebuy.shares(np.array([a.items.row(item)]))
        share_b = b.rebuy.shares(np.array([b.items.row(item)]))
        assert share_b == pytest.approx(share_a)
    assert compared


def test_a_partition_taken_after_a_crash_counts_every_items_change_once(hermetic: Hermetic) -> None:
    """A learns 60 events of partition 0: checkpoint after 20, a publish after 50, a crash after
    60. B takes partition 0: restores it at 20, re-learns 20..60 from Kafka, of which 20..50
    without item changes (A published them). B's popularity then counts each event once."""
    names = TopicNames(hermetic.prefix)
    lines = [line for line in real_events(hermetic, 400) if partition_of(decode_event(line).user_id, 2) == 0]
    lines = lines[:60]
    assert len(lines) == 60
    a = worker(hermetic)  # creates the topics
    recs = records(names, lines, 0)
    produce(hermetic, recs)
    through_50 = Counter(record.topic for record in recs[:50])
    expected = learned_once(a, lines)

    async def scenario() -> tuple[Recommender, dict[str, int]]:
        try:
            a.ownership.owned = {0}
            await a.handle_records(recs[:20])
            await a.ownership.save()
            await a.handle_records(recs[20:50])
            await a.exchange.publish()
            await a.handle_records(recs[50:])  # learned, never published: A dies here
        finally:
            await a.close()
        commit_all(hermetic, a, recs)
        b = worker(hermetic)
        try:
            await b.ownership.start()
            await b.ownership.take([0])
            return b.pipeline.recommender, dict(b.exchange.published_through)
        finally:
            await b.close()

    b, published = asyncio.run(scenario())
    for topic, offset in through_50.items():
        assert published[f"{topic}:0"] == offset
    got = popularity(b)
    assert set(got) >= set(expected)
    for item, count in expected.items():
        assert got[item] == pytest.approx(count, rel=1e-4), item
    assert sum(got.values()) == pytest.approx(sum(expected.values()), rel=1e-4)


def send_again(hermetic: Hermetic, topic: str) -> None:
    """Append a copy of the topic's first record (what a writer's resend after a lost
    acknowledgement leaves in the log): same key, headers and value."""
    consumer = KafkaConsumer(bootstrap_servers=hermetic.servers.kafka_bootstrap, auto_offset_reset="earliest")
    try:
        consumer.subscribe([topic])
        polled: list = []
        for _ in range(50):
            polled = [record for records in consumer.poll(timeout_ms=200).values() for record in records]
            if polled:
                break
        assert polled, f"nothing in {topic}"
        first = polled[0]
    finally:
        consumer.close()
    producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
    producer.send(
        topic, key=first.key, value=first.value, headers=first.headers, partition=first.partition
    ).get(30)
    producer.close()


def test_a_record_the_topic_holds_twice_counts_once(hermetic: Hermetic) -> None:
    """A publishes one record, reads it back and checkpoints; the topic then holds that record a
    second time. A, a worker that reads the topic from its start, and a worker started from A's
    checkpoint (whose read offset lies between the copies) each count the changes once."""
    names = TopicNames(hermetic.prefix)
    lines = [line for line in real_events(hermetic, 200) if partition_of(decode_event(line).user_id, 2) == 0]

    async def scenario() -> tuple[dict[str, float], list[dict[str, float]]]:
        a, reader = worker(hermetic), worker(hermetic)
        try:
            a.ownership.owned = {0}
            await a.handle_records(records(names, lines, 0))
            await a.exchange.publish()
            await a.exchange.read_to_end()  # A passes over its own record
            await a.ownership.save()
            expected = popularity(a.pipeline.recommender)
            send_again(hermetic, names.item_deltas)
            restarted = worker(hermetic)
            try:
                await restarted.ownership.start()  # A's checkpoint, then the topic from there
                await a.exchange.read_to_end()
                await reader.exchange.read_to_end()
                held = [popularity(each.pipeline.recommender) for each in (a, reader, restarted)]
            finally:
                await restarted.close()
            return expected, held
        finally:
            await a.close()
            await reader.close()

    expected, held = asyncio.run(scenario())
    assert expected
    for got in held:
        assert got.keys() == expected.keys()
        for item, count in expected.items():
            assert got[item] == pytest.approx(count, rel=1e-5), item


def test_a_checkpoint_says_how_far_its_item_changes_reach(hermetic: Hermetic) -> None:
    """A owns partitions 0 and 1: checkpoints both, learns more of both, hands partition 1 over
    (a checkpoint of the item state and of partition 1 only), then dies. B starts from that item
    state and takes partition 0 at its older checkpoint: what A learned of partition 0 between the
    two checkpoints is in the item state already (though the record that said so was never read
    back), so B re-learns it for the users only, and counts every event once."""
    names = TopicNames(hermetic.prefix)
    lines = real_events(hermetic, 240)
    by_partition = {
        p: [line for line in lines if partition_of(decode_event(line).user_id, 2) == p] for p in (0, 1)
    }
    recs = {p: records(names, chunk, p) for p, chunk in by_partition.items()}
    a = worker(hermetic)  # creates the topics
    produce(hermetic, recs[0])
    expected = learned_once(a, lines)

    async def scenario() -> Recommender:
        half = {p: len(chunk) // 2 for p, chunk in recs.items()}
        try:
            a.ownership.owned = {0, 1}
            for p in (0, 1):
                await a.handle_records(recs[p][: half[p]])
            await a.ownership.save()
            for p in (0, 1):
                await a.handle_records(recs[p][half[p] :])
            await a.ownership.give_up([1])  # A dies after this
        finally:
            await a.close()
        commit_all(hermetic, a, recs[0])
        b = worker(hermetic)
        try:
            await b.ownership.start()
            await b.ownership.take([0])
            await b.ownership.take([1])  # at its newest checkpoint: nothing to catch up
            return b.pipeline.recommender
        finally:
            await b.close()

    got = popularity(asyncio.run(scenario()))
    assert got.keys() >= expected.keys()
    for item, count in expected.items():
        assert got[item] == pytest.approx(count, rel=1e-4), item


def test_every_worker_holds_every_catalogue_item(hermetic: Hermetic) -> None:
    """The catalogue is read in full by each worker, whatever partitions the group gave it."""
    import gzip
    import itertools

    names = TopicNames(hermetic.prefix)
    with gzip.open(dataset("online-retail/items.jsonl.gz")) as lines:
        catalogue = [orjson.loads(line) for line in itertools.islice(lines, 40)]

    async def scenario() -> list[set[str]]:
        workers = [worker(hermetic), worker(hermetic)]
        producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
        for item in catalogue:  # keyed by item: spread over both partitions
            producer.send(names.items, key=item["item_id"].encode(), value=orjson.dumps(item)).get(30)
        producer.close()
        held = []
        try:
            for partition, each in enumerate(workers):
                each.ownership.owned = {partition}
                await each.exchange.read_to_end()
                recommender = each.pipeline.recommender
                embedded = recommender.content.catalogue
                assert embedded is not None, "no catalogue item reached this worker"
                held.append({item for row, item in enumerate(recommender.items.ids) if embedded.knows(row)})
        finally:
            for each in workers:
                await each.close()
        return held

    wanted = {item["item_id"] for item in catalogue}
    assert {partition_of(item, PARTITIONS) for item in wanted} == {0, 1}
    for held in asyncio.run(scenario()):
        assert held >= wanted


def test_a_checkpoint_from_before_the_sequence_numbers_holds_what_it_held(hermetic: Hermetic) -> None:
    """An item blob saved before 2026-12-04 lists the records it held beyond its read offsets
    (``skip``); each writer's highest of them says which records are in it."""

    async def scenario() -> list[bool]:
        each = worker(hermetic)
        try:
            each.exchange.restore({"read_offsets": {"d:0": 7}, "skip": [["w1", 3], ["w1", 1], ["w2", 5]]})
            keys = [("w1", 1), ("w1", 2), ("w1", 3), ("w1", 4), ("w2", 5), ("w2", 6), ("w3", 1)]
            return [each.exchange._held(key) for key in keys]
        finally:
            await each.close()

    assert asyncio.run(scenario()) == [True, True, True, False, True, False, False]
