"""`pushrec dlq`: the malformed corpus lands in the dead letters by reason; re-drive after a fix."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis
from kafka import KafkaProducer

from stream.topics import TopicNames
from tests.conftest import Hermetic
from tests.test_pipeline_e2e import MALFORMED, run_cli
from tests.test_recovery import run_worker_to_idle

pytestmark = pytest.mark.integration


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
