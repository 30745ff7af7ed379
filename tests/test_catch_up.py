"""The catch-up after a restart, against the real broker: the gap streamed in bounded batches,
and records the broker no longer holds counted instead of waited for (a checkpoint older than
retention; committed offsets past the log's end)."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from consumers.catch_up import CatchUp
from infra.kafka import KafkaAccess
from pushrec.demo import SAMPLE_EVENTS
from tests.conftest import Hermetic
from tests.test_pipeline_e2e import head, run_cli
from tests.test_recovery import run_worker_to_idle

pytestmark = pytest.mark.integration

RECORDS = 100


def topic_with_commit(hermetic: Hermetic, committed: int) -> tuple[str, str]:
    """A one-partition topic of RECORDS records and a group that committed ``committed``."""
    bootstrap = hermetic.servers.kafka_bootstrap
    topic, group = f"{hermetic.prefix}.gap", f"{hermetic.prefix}-group"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for n in range(RECORDS):
        producer.send(topic, key=b"u", value=b"%d" % n).get(timeout=30)
    producer.close()
    commit(bootstrap, group, TopicPartition(topic, 0), committed)
    return topic, group


def commit(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def log_ends(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """Each partition's end, from a fetch's high watermark (Tansu's ListOffsets answers the last
    batch's first offset plus one)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        while consumer.poll(timeout_ms=2000):
            pass
        return {tp: consumer.highwater(tp) or 0 for tp in partitions}
    finally:
        consumer.close()


def read_all(catch_up: CatchUp) -> list[list[int]]:
    return [[int(r.value) for r in batch] for batch in catch_up.batches()]


def test_the_gap_is_streamed_in_bounded_batches_from_the_checkpoint_to_the_commit(hermetic: Hermetic) -> None:
    topic, group = topic_with_commit(hermetic, committed=90)
    access = KafkaAccess(hermetic.servers.kafka_bootstrap)
    catch_up = CatchUp(access, group, [topic], {f"{topic}:0": 10}, batch_max=25)
    batches = read_all(catch_up)
    assert len(batches) >= 4 and all(len(b) <= 25 for b in batches)
    assert [n for b in batches for n in b] == list(range(10, 90))
    assert catch_up.records == 80 and catch_up.retention_lost == {} and catch_up.truncated == {}
    # Without a checkpoint offset: from the first retained record.
    from_start = read_all(CatchUp(access, group, [topic], {}, batch_max=25))
    assert [n for b in from_start for n in b] == list(range(90))


def test_committed_offsets_past_the_log_end_are_counted_not_waited_for(hermetic: Hermetic) -> None:
    """The broker lost records the group had read (unclean election, restore from an old copy):
    the catch-up reads to the log's end and counts the rest, where it used to stall and exit,
    and the restart stalled again: a crash loop."""
    topic, group = topic_with_commit(hermetic, committed=RECORDS + 50)
    catch_up = CatchUp(KafkaAccess(hermetic.servers.kafka_bootstrap), group, [topic], {f"{topic}:0": 60})
    assert [n for b in read_all(catch_up) for n in b] == list(range(60, RECORDS))
    assert catch_up.truncated == {f"{topic}:0": 50}


def test_a_checkpoint_older_than_retention_starts_at_the_first_retained_offset(
    hermetic: Hermetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deleted offsets 0-39. The embedded broker (Tansu) neither applies retention nor
    answers DeleteRecords, so the first retained offset it reports is moved to 40 here; the
    records, the seek and the reads are the real broker's. The old catch-up sought to the
    checkpoint's offset 10 on a consumer resetting to `latest`: it stalled or skipped the lot."""
    topic, group = topic_with_commit(hermetic, committed=90)
    real = KafkaConsumer.beginning_offsets
    monkeypatch.setattr(
        KafkaConsumer,
        "beginning_offsets",
        lambda self, partitions: {tp: max(40, n) for tp, n in real(self, partitions).items()},
    )
    catch_up = CatchUp(KafkaAccess(hermetic.servers.kafka_bootstrap), group, [topic], {f"{topic}:0": 10})
    assert [n for b in read_all(catch_up) for n in b] == list(range(40, 90))
    assert catch_up.retention_lost == {f"{topic}:0": 30}


def test_a_worker_whose_group_committed_past_the_log_end_starts_and_says_so(hermetic: Hermetic) -> None:
    log = head(SAMPLE_EVENTS, hermetic.tmp / "events.jsonl", 300)  # purchases only
    assert run_cli(hermetic, "replay", str(log)).returncode == 0
    bootstrap = hermetic.servers.kafka_bootstrap
    topic = f"{hermetic.prefix}.events.purchase"
    ends = log_ends(bootstrap, topic)
    written = {tp: end for tp, end in ends.items() if end > 0}
    assert written
    for tp, end in written.items():
        commit(bootstrap, f"{hermetic.prefix}-worker", tp, end + 50)
    run_worker_to_idle(hermetic, "worker.log")
    text = hermetic.log("worker.log")
    assert f"the group committed {50 * len(written)} record(s) the broker no longer holds" in text
    assert "caught up 300 records" in text
