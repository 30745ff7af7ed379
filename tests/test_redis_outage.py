"""Regression: a Redis outage during a replay used to crash the agent and lose the batch's lists."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import orjson
import pytest
import redis

from infra.metrics import metric_sum, scrape
from infra.stack import free_port, redis_answers, valkey_binary
from pushrec.demo import stop_process, wait_for
from stream.events import decode_event, decode_item
from tests.conftest import Hermetic, dataset
from tests.test_pipeline_e2e import head, missing_lists, run_cli, wait_joined, wait_metric

pytestmark = pytest.mark.integration


class OwnValkey:
    """A Valkey of this test's own, so stopping it does not disturb the other tests."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self.options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for("Valkey to answer", lambda: redis_answers(self.url), 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def own_valkey() -> Iterator[OwnValkey]:
    valkey = OwnValkey()
    valkey.start()
    try:
        yield valkey
    finally:
        valkey.stop()


def test_lists_and_catalogue_catch_up_after_valkey_returns(hermetic: Hermetic, own_valkey: OwnValkey) -> None:
    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 2000)
    users = {decode_event(line).user_id for line in log.read_bytes().splitlines()}
    catalogue = head(dataset("taobao/items.jsonl.gz"), hermetic.tmp / "items.jsonl", 300)
    items = [decode_item(line) for line in catalogue.read_bytes().splitlines()]
    no_events = hermetic.tmp / "none.jsonl"
    no_events.write_bytes(b"")
    port = free_port()
    env = {"PUSHREC_REDIS_URL": own_valkey.url, "PUSHREC_REDIS__RETRIES": "1"}
    worker = hermetic.spawn("worker", "--metrics-port", str(port), log_name="worker.log", **env)
    try:
        wait_joined(port, worker)
        own_valkey.stop()
        assert run_cli(hermetic, "replay", str(no_events), "--items", str(catalogue)).returncode == 0
        assert run_cli(hermetic, "replay", str(log)).returncode == 0
        wait_metric(
            port,
            worker,
            "events learned during the outage",
            "pushrec_events_total",
            2000,
            120,
            outcome="processed",
        )
        assert metric_sum(scrape(port), "pushrec_catalogue_items_total") == len(items)
        # Forget requests cannot be read meanwhile: said, and read again later.
        assert "forget requests could not be read (connection)" in hermetic.log("worker.log")
        assert metric_sum(scrape(port), "pushrec_redis_errors_total") >= 1
        assert metric_sum(scrape(port), "pushrec_list_refreshes_total") == 0

        own_valkey.start()
        wait_metric(port, worker, "every list to be written", "pushrec_event_to_list_seconds_count", 2000, 60)
        client = redis.Redis.from_url(own_valkey.url)
        assert missing_lists(client, hermetic.prefix, users) == []
        # The catalogue published during the outage is stored too (it used to be dropped).
        wait_for(
            "every catalogue item stored",
            lambda: all(client.exists(f"{hermetic.prefix}:item:{i.item_id}") for i in items),
            30,
            worker,
        )
        first = items[0]
        assert client.hget(f"{hermetic.prefix}:item:{first.item_id}", "category") == first.category.encode()  # type: ignore[union-attr]
        assert worker.poll() is None
        assert "Restarting dead" not in hermetic.log("worker.log")
    finally:
        stop_process(worker)


@pytest.mark.parametrize("refusal", ["oom", "readonly", "noscript"])
def test_a_redis_that_answers_with_an_error_is_an_outage_not_a_crash(
    hermetic: Hermetic, own_valkey: OwnValkey, refusal: str
) -> None:
    """Issue 19, item 2: an over-full Redis (maxmemory + noeviction: OOM), a replica after a
    failover (READONLY) and a flushed script cache (NOSCRIPT) answer with an error, not a lost
    connection; the worker exited with code 70 on the first two and crash-looped on restart."""
    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 1500)
    users = {decode_event(line).user_id for line in log.read_bytes().splitlines()}
    primary = redis.Redis.from_url(own_valkey.url)
    replica = OwnValkey("--replicaof", "127.0.0.1", str(own_valkey.port))
    target = own_valkey
    if refusal == "readonly":
        replica.start()
        target = replica
    port = free_port()
    worker = hermetic.spawn(
        "worker", "--metrics-port", str(port), log_name="worker.log", PUSHREC_REDIS_URL=target.url
    )
    client = redis.Redis.from_url(target.url)
    try:
        wait_joined(port, worker)
        if refusal == "oom":
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))
        elif refusal == "noscript":  # lists written (scripts loaded), then the cache flushed
            first = hermetic.tmp / "first.jsonl"
            first.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:300]))
            assert run_cli(hermetic, "replay", str(first)).returncode == 0
            wait_metric(port, worker, "the first lists", "pushrec_list_refreshes_total", 1, 60)
            client.script_flush()
        assert run_cli(hermetic, "replay", str(log)).returncode == 0
        wait_metric(
            port, worker, "every event learned", "pushrec_events_total", 1500, 120, outcome="processed"
        )
        if refusal != "noscript":
            wait_metric(
                port, worker, "the refusal to be counted", "pushrec_redis_errors_total", 1, 30, kind=refusal
            )
            assert metric_sum(scrape(port), "pushrec_list_refreshes_total") == 0
        if refusal == "oom":
            client.config_set("maxmemory", "0")
        elif refusal == "readonly":  # the failover completes: the replica becomes the primary
            client.execute_command("REPLICAOF", "NO", "ONE")
        wait_metric(port, worker, "every list to be written", "pushrec_event_to_list_seconds_count", 1500, 90)
        assert missing_lists(client, hermetic.prefix, users) == []
        assert worker.poll() is None, hermetic.log("worker.log")[-2000:]
    finally:
        stop_process(worker)
        replica.stop()
        primary.close()


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_learning_goes_on_while_redis_is_away_or_hung_under_the_defaults(
    hermetic: Hermetic, own_valkey: OwnValkey, fault: str
) -> None:
    """Issue 19, item 3: with the default retries (5), a Redis that hangs (SIGSTOP) holds a write
    for about a minute (10 s socket timeout per try); list writes used to be awaited by the
    learning loop, so learning stopped with them. Valkey killed or hung mid-replay: every event
    is learned meanwhile, and every list lands once Redis is back."""
    import os
    import signal

    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 3000)
    lines = log.read_bytes().splitlines(keepends=True)
    first, rest = hermetic.tmp / "first.jsonl", hermetic.tmp / "rest.jsonl"
    first.write_bytes(b"".join(lines[:500]))
    rest.write_bytes(b"".join(lines[500:]))
    users = {decode_event(line).user_id for line in lines}
    port = free_port()
    worker = hermetic.spawn(
        "worker", "--metrics-port", str(port), log_name="worker.log", PUSHREC_REDIS_URL=own_valkey.url
    )
    assert own_valkey.proc is not None
    valkey_pid = own_valkey.proc.pid
    try:
        wait_joined(port, worker)
        assert run_cli(hermetic, "replay", str(first)).returncode == 0
        wait_metric(port, worker, "the first lists", "pushrec_event_to_list_seconds_count", 500, 60)
        if fault == "killed":
            own_valkey.stop()
        else:
            os.kill(valkey_pid, signal.SIGSTOP)
        assert run_cli(hermetic, "replay", str(rest)).returncode == 0
        wait_metric(
            port,
            worker,
            "every event learned while Redis is away",
            "pushrec_events_total",
            3000,
            120,
            outcome="processed",
        )
        if fault == "hung":  # the first write is still in the client's retries, learning went on
            assert metric_sum(scrape(port), "pushrec_redis_errors_total") == 0
            os.kill(valkey_pid, signal.SIGCONT)
        else:
            own_valkey.start()
        wait_metric(
            port, worker, "every list to be written", "pushrec_event_to_list_seconds_count", 3000, 150
        )
        client = redis.Redis.from_url(own_valkey.url)
        # A killed Valkey of ours restarts empty (no persistence): the lists that must land are
        # those of the users touched during the outage; a hung one kept everything.
        expected = users if fault == "hung" else {decode_event(line).user_id for line in lines[500:]}
        assert missing_lists(client, hermetic.prefix, expected) == []
        assert worker.poll() is None, hermetic.log("worker.log")[-2000:]
    finally:
        if fault == "hung":
            os.kill(valkey_pid, signal.SIGCONT)
        stop_process(worker)


def test_a_write_is_one_round_trip_and_survives_redis_losing_its_scripts(own_valkey: OwnValkey) -> None:
    """Lists and catalogue items go out as EVALSHA calls in one pipeline, without redis-py's
    SCRIPT EXISTS before each (a second round trip per write); a Redis that lost the scripts
    (a restart, SCRIPT FLUSH) gets them loaded again and the write goes through."""
    import asyncio

    from infra.store import Keys, RedisTopNStore, connect
    from online_models.recommender import TopN
    from stream.events import Item

    sync = redis.Redis.from_url(own_valkey.url)

    def calls(command: str) -> int:
        return int(sync.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    async def write() -> list[int]:
        client = connect(own_valkey.url)
        try:
            store = RedisTopNStore(client, Keys("t:"))
            await store.write_items([Item("i1", title="red wool hat", price=9.5)])
            tops = [TopN(user, ["i1", "i2"], [0.9, 0.1], "pushrec", ["why", "why"]) for user in ("u1", "u2")]
            return await store.write_lists(tops, 1.0)
        finally:
            await client.aclose()

    try:
        asyncio.run(write())  # a fresh Valkey: the scripts are loaded on the first NOSCRIPT
        sync.config_resetstat()
        first = asyncio.run(write())
        assert calls("evalsha") == 2  # items, then lists: one round trip each
        assert calls("script|exists") == 0 and calls("script|load") == 0
        sync.script_flush()
        again = asyncio.run(write())  # loaded again: the lists written once more
        assert all(b > a for a, b in zip(first, again, strict=True)), (first, again)
        assert calls("script|exists") == 0 and calls("script|load") == 2
        assert sync.hget("t:item:i1", "title") == b"red wool hat"
        first_item = orjson.loads(sync.hget("t:recs:u1", "items"))[0]
        assert first_item == {"item_id": "i1", "score": 0.9, "reason": "why"}
    finally:
        sync.close()
