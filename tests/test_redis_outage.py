"""Regression: a Redis outage during a replay used to crash the agent and lose the batch's lists."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redis

from infra.metrics import metric_sum, scrape
from infra.stack import free_port, redis_answers, valkey_binary
from pushrec.demo import stop_process, wait_for
from stream.events import decode_event
from tests.conftest import Hermetic, dataset
from tests.test_pipeline_e2e import head, run_cli, wait_joined

pytestmark = pytest.mark.integration


class OwnValkey:
    """A Valkey of this test's own, so stopping it does not disturb the other tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
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


def test_lists_catch_up_after_valkey_returns(hermetic: Hermetic, own_valkey: OwnValkey) -> None:
    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 2000)
    users = {decode_event(line).user_id for line in log.read_bytes().splitlines()}
    port = free_port()
    env = {"PUSHREC_REDIS_URL": own_valkey.url, "PUSHREC_REDIS__RETRIES": "1"}
    worker = hermetic.spawn("worker", "--metrics-port", str(port), log_name="worker.log", **env)
    try:
        wait_joined(port, worker)
        own_valkey.stop()
        assert run_cli(hermetic, "replay", str(log)).returncode == 0
        wait_for(
            "events learned during the outage",
            lambda: metric_sum(scrape(port), "pushrec_events_total", outcome="processed") >= 2000,
            120,
            worker,
        )
        assert metric_sum(scrape(port), "pushrec_redis_errors_total") >= 1
        assert metric_sum(scrape(port), "pushrec_list_refreshes_total") == 0

        own_valkey.start()
        wait_for(
            "every list to be written",
            lambda: metric_sum(scrape(port), "pushrec_event_to_list_seconds_count") >= 2000,
            60,
            worker,
        )
        client = redis.Redis.from_url(own_valkey.url)
        assert [u for u in users if not client.hexists(f"{hermetic.prefix}:recs:{u}", "items")] == []
        assert worker.poll() is None
        assert "Restarting dead" not in hermetic.log("worker.log")
    finally:
        stop_process(worker)
