"""Several workers in one group, on the real broker and Valkey: state follows its partition.

Two workers share four partitions; one is killed with -9 while the first 60 % of a real taobao
log is replayed. The survivor takes its partitions with their users' state (restored from the
partition checkpoints, caught up from Kafka); a third worker joins and takes some, the survivor
stops and hands its partitions over. Every event must be learned exactly once across them, and the users whose
partitions moved must keep what they learned: the items they touched before the move are in
their final lists as often as with one uninterrupted worker (issue 13 measured 21 % against 56 %
when a new owner started them empty). The group's item state, too, counts every event once.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis

from infra.checkpoint import unpack
from infra.kafka import KafkaAccess
from infra.metrics import metric_sum, scrape
from infra.stack import free_port
from pushrec.demo import stop_process, wait_for
from stream.events import decode_event
from stream.topics import TopicNames, ensure_topics, partition_of
from tests.conftest import Hermetic, dataset, model_process
from tests.test_pipeline_e2e import head, wait_joined
from tests.test_recovery import running

pytestmark = pytest.mark.integration

PARTITIONS = 4
EVENTS, BEFORE_MOVE = 4000, 2400
# Checkpoints less often than item changes are published (1 s): a killed worker has published
# item changes of events its checkpoint does not hold.
WORKER_ENV = {"PUSHREC_KAFKA__PARTITIONS": str(PARTITIONS), "PUSHREC_CHECKPOINT__EVERY_S": "2.5"}


def replay(hermetic: Hermetic, log: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pushrec.cli", "replay", str(log)],
        env=hermetic.env(**WORKER_ENV),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def owned(log_text: str) -> list[int]:
    """The partitions of a worker's last assignment, from its log."""
    found = re.findall(r"assigned \d+ event partitions: \[([\d, ]*)\] of (\d+)", log_text)
    assert found, log_text[-2000:]
    numbers, count = found[-1]
    assert int(count) == PARTITIONS
    return [int(n) for n in numbers.split(",") if n.strip()]


def settled(port: int, worker: subprocess.Popen[bytes], quiet_s: float = 2.5) -> None:
    """Wait until the worker learned everything it was given and is quiet."""
    last, since = -1.0, time.monotonic()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert worker.poll() is None, "worker exited"
        samples = scrape(port)
        seen = metric_sum(samples, "pushrec_events_total")
        if seen != last:
            last, since = seen, time.monotonic()
        elif time.monotonic() - since >= quiet_s and metric_sum(samples, "pushrec_worker_consumer_lag") == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the worker never settled")


def kept_share(client: redis.Redis, prefix: str, touched: dict[str, set[str]]) -> float:
    """Share of these users whose final list holds an item they touched before the move."""
    kept = 0
    for user, items in touched.items():
        raw = client.hget(f"{prefix}:recs:{user}", "items")
        listed = {entry["item_id"] for entry in orjson.loads(raw)} if raw else set()
        kept += bool(listed & items)
    return kept / len(touched)


def learned_events(names: Hermetic) -> int:
    """Events in the users' state of every partition checkpoint (each learned event counts once):
    on disk, or in Redis for the run that keeps its checkpoints there (as compose does)."""
    directory = names.tmp / "state" / "checkpoints" / f"{names.prefix}-worker"
    blobs = [path.read_bytes() for path in directory.glob("p*.npz")]
    client = redis.Redis.from_url(names.servers.redis_url)
    blobs += [
        client.get(key) for key in client.scan_iter(f"{names.prefix}:checkpoint:{names.prefix}-worker:p*")
    ]
    assert blobs
    total = 0
    for blob in blobs:
        meta, _ = unpack(blob)
        total += sum(history[0] for history in meta["model"]["users"].values())
    return total


def item_popularity(names: Hermetic, store: str) -> dict[str, float]:
    """Each item's decayed count in the item state a worker of this group starts with."""
    import asyncio

    from consumers.worker import RefreshWorker

    settings = names.settings(**WORKER_ENV, PUSHREC_CHECKPOINT__STORE=store)

    async def start() -> dict[str, float]:
        worker = RefreshWorker(settings, KafkaAccess(names.servers.kafka_bootstrap), names.servers.redis_url)
        try:
            await worker.ownership.start()
            recommender = worker.pipeline.recommender
            scores = recommender.popularity.scores()
            return {
                item: float(scores[row])
                for row, item in enumerate(recommender.items.ids)
                if row < scores.size
            }
        finally:
            await worker.close()

    return asyncio.run(start())


def test_partitions_move_with_their_users_state_through_a_kill_a_scale_up_and_a_scale_down(
    hermetic: Hermetic,
) -> None:
    """Workers A and B; A killed with -9 after 60 % of the log (B takes its partitions); C joins
    (B hands some over); B stops (C takes them back) before the last events. Every event is
    learned exactly once across them, and A's users keep what they learned."""
    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", EVENTS)
    lines = log.read_bytes().splitlines(keepends=True)
    parts = [hermetic.tmp / f"part{n}.jsonl" for n in range(3)]
    for path, chunk in zip(parts, (lines[:BEFORE_MOVE], lines[BEFORE_MOVE:3400], lines[3400:]), strict=True):
        path.write_bytes(b"".join(chunk))
    touched: dict[str, set[str]] = defaultdict(set)
    for line in lines[:BEFORE_MOVE]:
        event = decode_event(line)
        touched[event.user_id].add(event.item_id)

    def start(names: Hermetic, n: int) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        store = "redis" if names is scaled else "disk"  # the shared store of several machines
        env = {**WORKER_ENV, "PUSHREC_CHECKPOINT__STORE": store}
        worker = names.spawn("worker", "--metrics-port", str(port), log_name=f"worker{n}.log", **env)
        wait_joined(port, worker)
        return port, worker

    def owners(names: Hermetic, *ns: int) -> list[int]:
        return sorted(p for n in ns for p in owned(names.log(f"worker{n}.log")))

    scaled = hermetic.fresh()
    ensure_topics(KafkaAccess(scaled.servers.kafka_bootstrap), TopicNames(scaled.prefix).all, PARTITIONS, 1)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        (port_a, a), (port_b, b) = start(scaled, 0), start(scaled, 1)
        workers += [a, b]
        everything = list(range(PARTITIONS))
        wait_for("A and B to split the partitions", lambda: owners(scaled, 0, 1) == everything, 60, a)
        # A is killed mid-replay: what it learned after its last checkpoint (and published to the
        # group's item state, or not) is re-learned by B from Kafka.
        feeding = scaled.spawn("replay", str(parts[0]), "--rate", "400", log_name="replay0.log", **WORKER_ENV)
        wait_for(
            "A to learn a third of the first part",
            lambda: metric_sum(scrape(port_a), "pushrec_events_total") >= BEFORE_MOVE / 6,
            60,
            a,
        )
        moved = owned(scaled.log("worker0.log"))
        assert 0 < len(moved) < PARTITIONS
        model = model_process(a.pid)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        wait_for("A's model process to die", lambda: not running(model), 10)
        assert feeding.wait(timeout=60) == 0, scaled.log("replay0.log")
        wait_for("B to take every partition", lambda: owners(scaled, 1) == everything, 90, b)
        settled(port_b, b)
        port_c, c = start(scaled, 2)  # scale up
        workers.append(c)
        wait_for("B and C to split the partitions", lambda: owners(scaled, 1, 2) == everything, 60, c)
        replay(scaled, parts[1])
        settled(port_b, b)
        settled(port_c, c)
        b.send_signal(signal.SIGTERM)  # scale down
        assert b.wait(timeout=60) == 0, scaled.log("worker1.log")[-3000:]
        wait_for("C to take every partition", lambda: owners(scaled, 2) == everything, 90, c)
        replay(scaled, parts[2])
        settled(port_c, c)
        c.send_signal(signal.SIGTERM)
        assert c.wait(timeout=60) == 0, scaled.log("worker2.log")[-3000:]
    finally:
        for worker in workers:
            stop_process(worker)
    for n in (1, 2):
        assert "different partition numbers per topic" not in scaled.log(f"worker{n}.log")
    took = re.findall(r"took partition\(s\) \[([\d, ]*)\]: (\d+) users restored", scaled.log("worker1.log"))
    takes = [({int(n) for n in numbers.split(",")}, int(users)) for numbers, users in took]
    assert any(partitions >= set(moved) and users > 0 for partitions, users in takes), takes
    # Exactly once: A's learning after its last checkpoint was re-learned by B from Kafka, the
    # hand-overs to and from C lost and repeated nothing.
    assert learned_events(scaled) == EVENTS

    # One uninterrupted worker on the same log.
    single = hermetic.fresh()
    ensure_topics(KafkaAccess(single.servers.kafka_bootstrap), TopicNames(single.prefix).all, PARTITIONS, 1)
    port, worker = start(single, 0)
    try:
        for path in parts:
            replay(single, path)
        settled(port, worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, single.log("worker0.log")[-3000:]
    finally:
        stop_process(worker)
    assert learned_events(single) == EVENTS

    # One item state: the group's, as a worker starting now would hold it (the last checkpoint
    # and the item changes published since), counts every event once, like the single worker.
    group_items, single_items = item_popularity(scaled, "redis"), item_popularity(single, "disk")
    assert group_items.keys() == single_items.keys()
    for item, count in single_items.items():
        assert group_items[item] == pytest.approx(count, rel=1e-4, abs=1e-6), item

    # The same users in both runs: those of the partitions A had.
    moved_users = {u: items for u, items in touched.items() if partition_of(u, PARTITIONS) in moved}
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    kept_after_move = kept_share(client, scaled.prefix, moved_users)
    kept_uninterrupted = kept_share(client, single.prefix, moved_users)
    print(
        f"moved partitions {moved}: {len(moved_users)} users; kept {kept_after_move:.3f} "
        f"after the moves, {kept_uninterrupted:.3f} uninterrupted"
    )
    assert kept_uninterrupted > 0.2
    assert kept_after_move >= 0.9 * kept_uninterrupted, (kept_after_move, kept_uninterrupted)
