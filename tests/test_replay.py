"""The replay's producer against the real broker: each user's events on the partition their state
lives on (Kafka's default partitioner, as ``partition_of`` computes it), in the log's order; and a
broker that is not there is a one-line error, not a hang."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from infra.kafka import KafkaAccess
from infra.stack import free_port
from pushrec.demo import SAMPLE_EVENTS
from stream.replay import Pacing, Replayer, ReplayError, read_lines
from stream.topics import TopicNames, ensure_topics, partition_of
from tests.conftest import Hermetic

pytestmark = pytest.mark.integration

PARTITIONS = 6


def test_a_replay_puts_each_users_events_on_their_partition_in_order(hermetic: Hermetic) -> None:
    names = TopicNames(hermetic.prefix)
    ensure_topics(hermetic.kafka, names.all, PARTITIONS)
    replayer = Replayer(hermetic.kafka, names)
    try:
        summary = replayer.replay(SAMPLE_EVENTS, pacing=Pacing(), progress=False)
    finally:
        replayer.close()
    sent = sum(summary.sent.values())
    assert sent > 1000

    consumer = KafkaConsumer(
        *summary.sent,
        bootstrap_servers=hermetic.servers.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    received: dict[tuple[str, str], list[str]] = defaultdict(list)  # (topic, user) -> event ids
    try:
        for record in consumer:
            event = orjson.loads(record.value)
            assert record.key == event["user_id"].encode()
            assert record.partition == partition_of(event["user_id"], PARTITIONS), event
            received[record.topic, event["user_id"]].append(event["event_id"])
    finally:
        consumer.close()
    assert sum(map(len, received.values())) == sent

    logged: dict[tuple[str, str], list[str]] = defaultdict(list)
    for _, line in read_lines(SAMPLE_EVENTS):
        event = orjson.loads(line)
        logged[names.events(event["type"]), event["user_id"]].append(event["event_id"])
    assert received == logged  # every user's events per topic, in the log's order


def test_a_replay_to_a_broker_that_is_not_there_fails_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes(b"".join(line + b"\n" for _, line in list(read_lines(SAMPLE_EVENTS))[:50]))
    replayer = Replayer(KafkaAccess(f"127.0.0.1:{free_port()}"), TopicNames("nowhere"), delivery_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(
        ReplayError, match=r"^50 records were not delivered to Kafka at 127\.0\.0\.1:\d+, first: .*timed out"
    ):
        replayer.replay(log, pacing=Pacing(), progress=False)
    assert time.monotonic() - started < 20
