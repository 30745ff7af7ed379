"""`pushrec dlq`: the malformed corpus lands in the dead letters by reason; re-drive after a fix."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from infra.kafka import KafkaAccess
from stream.deadletter import dead_letter_headers
from stream.dlq import redrive
from stream.events import Reason
from stream.topics import TopicNames
from tests.conftest import Hermetic
from tests.test_pipeline_e2e import MALFORMED, run_cli
from tests.test_recovery import run_worker_to_idle

pytestmark = pytest.mark.integration


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    records = []
    try:
        while polled := consumer.poll(timeout_ms=3000):
            records += [r for batch in polled.values() for r in batch]
    finally:
        consumer.close()
    return records


def test_list_by_reason_then_redrive_after_a_fix(hermetic: Hermetic) -> None:
    names = TopicNames(hermetic.prefix)
    assert run_cli(hermetic, "dlq", "list").returncode == 0  # creates the topics; nothing yet
    producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
    producer.send(
        names.events("view"),
        key=b"ok",
        value=b'{"event_id":"g1","type":"view","user_id":"ok","item_id":"i","ts":1}',
    )
    for kind, raw, _ in MALFORMED:
        producer.send(names.events(kind), key=b"bad-user", value=raw)
    producer.flush()
    producer.close()
    run_worker_to_idle(hermetic, "worker.log")

    listed = run_cli(hermetic, "dlq", "list", "--json", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["total"] == len(MALFORMED)
    assert report["by_reason"] == dict(Counter(reason.value for _, _, reason in MALFORMED))
    assert {(d["source"]["topic"], d["reason"]) for d in report["letters"]} == {
        (names.events(kind), reason.value) for kind, _, reason in MALFORMED
    }

    # "The fix": longer ids are allowed now. Re-drive only those letters, then run the fixed worker.
    fixed = {"PUSHREC_EVENTS__MAX_ID_LENGTH": "1000"}
    dry = json.loads(
        run_cli(hermetic, "dlq", "redrive", "--reason", "id_too_long", "--dry-run", "--json").stdout
    )
    assert dry["total"] == 1
    sent = run_cli(hermetic, "dlq", "redrive", "--reason", "id_too_long", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["total"] == 1
    run_worker_to_idle(hermetic, "fixed.log", **fixed)
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    assert client.exists(f"{hermetic.prefix}:recs:{'u' * 300}")  # the re-driven event was learned
    again = json.loads(run_cli(hermetic, "dlq", "list", "--json").stdout)
    assert again["total"] == len(MALFORMED)  # nothing new: it did not fail a second time
    twice = json.loads(run_cli(hermetic, "dlq", "redrive", "--reason", "id_too_long", "--json").stdout)
    assert twice["total"] == 0  # already re-driven


def test_redrive_advances_only_past_sends_the_broker_confirmed(
    hermetic: Hermetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Letter 2's send fails (forced: the embedded broker accepts every record; a real cluster
    fails sends on timeouts, authorisation, quotas); letter 4 names a topic Kafka cannot have (the
    real producer refuses it). The first run must stop its offset at letter 2 and pass over 4; the
    second resends from 2. The old re-drive committed past both, and crashed on letter 4."""
    bootstrap = hermetic.servers.kafka_bootstrap
    dead, source, group = f"{hermetic.prefix}.dl", f"{hermetic.prefix}.src", f"{hermetic.prefix}-redrive"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(dead, 1, 1), NewTopic(source, 1, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for n in range(5):
        origin = "bad/topic" if n == 4 else source
        headers = dead_letter_headers(Reason.INVALID_JSON, "bad", origin, 0, n)
        producer.send(dead, key=b"u", value=b"letter-%d" % n, headers=headers).get(timeout=30)
    producer.close()

    real_send = KafkaProducer.send

    def send_failing_letter_2(self: KafkaProducer, topic: str, value: bytes, **kw: object) -> Future:
        if value == b"letter-2":
            return Future().failure(KafkaTimeoutError("forced: not confirmed"))
        return real_send(self, topic, value=value, **kw)

    access = KafkaAccess(bootstrap)
    with monkeypatch.context() as patch:
        patch.setattr(KafkaProducer, "send", send_failing_letter_2)
        first = redrive(access, dead, group)
    assert [d["dead_letter"]["offset"] for d in first.failed] == [2]
    assert [d["dead_letter"]["offset"] for d in first.unsendable] == [4]
    assert "illegal" in first.unsendable[0]["error"]
    second = redrive(access, dead, group)
    assert [d["dead_letter"]["offset"] for d in second.letters] == [2, 3, 4]
    assert second.failed == [] and [d["dead_letter"]["offset"] for d in second.unsendable] == [4]
    assert redrive(access, dead, group).total == 0
    delivered = sorted(int(r.value.removeprefix(b"letter-")) for r in read_topic(bootstrap, source))
    assert delivered == [0, 1, 2, 3, 3]  # at least once: 3 again, after the failed 2
