"""Monitoring, tested for real: promtool on the shipped files; a real Prometheus server (Debian's
`prometheus` package, installed by .ci/run) scrapes a live worker and push sender during a replay,
and every PromQL expression of the dashboard and the alert rules returns data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from infra.loop_watch import LoopWatch
from infra.settings import env_example
from infra.stack import free_port
from pushrec.demo import stop_process, wait_for
from tests.conftest import ROOT, Hermetic, dataset
from tests.test_pipeline_e2e import head, wait_joined

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "pushrec.json"
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (bash .ci/run does)")
    return path


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queries() -> dict[str, str]:
    """Every query to prove: each dashboard target, and each side of each alert's comparison
    (an alert's full expression returns data only while it fires)."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for rule in alert_rules():
        sides = COMPARISON.split(rule["expr"])
        assert len(sides) == 3, f"{rule['alert']}: expected '<query> <op> <threshold>'"
        for side, text in zip(("lhs", "rhs"), (sides[0], sides[2]), strict=True):
            if "pushrec_" in text or "time()" in text:
                found[f"alert {rule['alert']} {side}"] = text
    return found


def test_a_blocked_event_loop_is_logged_with_how_often_and_longest(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18: the worker's processes log when their event loop could run nothing else for
    LOOP_BLOCK_S or more, summed per report interval (the lags themselves go to a histogram)."""
    lags: list[float] = []
    watch = LoopWatch("model", lags.append, block_s=0.1, report_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="pushrec.loop"):
        for lag in (0.002, 0.15, 0.01, 0.4):
            watch.note(lag)
        assert not caplog.records  # summed until the report interval has passed
        watch.report_s = 0.0
        watch.note(0.003)
    assert lags == [0.002, 0.15, 0.01, 0.4, 0.003]
    (record,) = caplog.records
    assert "model process's event loop was blocked 2 time(s) for 100 ms or more" in record.getMessage()
    assert "the longest 400 ms" in record.getMessage()
    caplog.clear()
    watch.note(0.01)  # nothing since: nothing to say
    assert not caplog.records and watch.blocks == 0


def test_blocks_not_reported_yet_are_logged_when_the_watch_stops(caplog: pytest.LogCaptureFixture) -> None:
    """A process that stops before its report interval (a bench's 20-s run) still logs them."""

    async def blocked_then_stopped() -> None:
        watch = LoopWatch("faust", lambda lag: None, block_s=0.05, interval_s=0.01, report_s=3600.0)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.03)
        time.sleep(0.1)  # the loop can run nothing meanwhile
        await asyncio.sleep(0.03)
        assert not caplog.records  # the interval has not passed
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="pushrec.loop"):
        asyncio.run(blocked_then_stopped())
    (record,) = caplog.records  # (a busy machine may add a block of its own to the count)
    assert re.search(r"faust process's event loop was blocked \d+ time\(s\) for 50 ms", record.getMessage())


def test_promtool_accepts_config_and_rules() -> None:
    promtool = binary("promtool")
    for args in (
        ["check", "config", PROMETHEUS_DIR / "prometheus.yml"],
        ["check", "rules", PROMETHEUS_DIR / "alerts.yml"],
    ):
        result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_entry() -> None:
    runbooks = (ROOT / "docs" / "operations.md").read_text().lower()
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == rule["alert"].lower() and f"### {rule['alert'].lower()}" in runbooks


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_a_live_worker_and_every_query_returns_data(hermetic: Hermetic) -> None:
    prometheus = binary("prometheus")
    log = head(dataset("taobao/events.jsonl.gz"), hermetic.tmp / "events.jsonl", 3000)
    worker_port, sender_port, prom_port = free_port(), free_port(), free_port()
    config = hermetic.tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "pushrec-worker",
                        "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
                    },
                    {
                        "job_name": "pushrec-push-sender",
                        "static_configs": [{"targets": [f"127.0.0.1:{sender_port}"]}],
                    },
                ],
            }
        )
    )
    env = {"PUSHREC_CHECKPOINT__EVERY_S": "1"}
    worker = hermetic.spawn("worker", "--metrics-port", str(worker_port), log_name="worker.log", **env)
    sender = hermetic.spawn(
        "push-sender",
        "--outbox",
        str(hermetic.tmp / "outbox.jsonl"),
        "--metrics-port",
        str(sender_port),
        log_name="sender.log",
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={hermetic.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=open(hermetic.tmp / "prometheus.log", "wb"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    try:
        wait_joined(worker_port, worker)
        replay = hermetic.spawn("replay", str(log), "--rate", "300", log_name="replay.log")
        wait_for(
            "Prometheus to scrape both targets",
            lambda: [t["health"] for t in api(prom_port, "targets")["activeTargets"]] == ["up", "up"],
            60,
            server,
        )
        assert replay.wait(timeout=120) == 0, hermetic.log("replay.log")
        wait_for(
            "the replay's events in Prometheus",
            lambda: (
                float(api(prom_port, "query", query="sum(pushrec_events_total)")["result"][0]["value"][1])
                >= 3000
            ),
            60,
            server,
        )
        time.sleep(3)  # a few more scrapes, so every rate() window holds two samples after the replay
        empty = {
            name: expr
            for name, expr in queries().items()
            if not api(prom_port, "query", query=expr)["result"]
        }
        assert empty == {}, f"queries that returned no data: {empty}"
        rules = [r["name"] for g in api(prom_port, "rules")["groups"] for r in g["rules"]]
        assert sorted(rules) == sorted(r["alert"] for r in alert_rules())
        assert worker.poll() is None and sender.poll() is None
    finally:
        for proc in (worker, sender, server):
            stop_process(proc)


def test_compose_file_structure() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "worker", "push-sender", "prometheus", "grafana"}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert services["redis"]["image"].startswith("redis:")
    assert (
        services["worker"]["command"][0] == "worker"
        and services["push-sender"]["command"][0] == "push-sender"
    )
    assert services["push-sender"]["image"] == services["worker"]["image"]  # one image
    assert (ROOT / services["worker"]["build"]["dockerfile"]).exists()
    for name in ("kafka", "redis", "worker", "push-sender", "prometheus"):
        assert "healthcheck" in services[name], name
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    known = {line.split("=")[0].lstrip("# ") for line in env_example().splitlines() if "PUSHREC_" in line}
    for name in ("worker", "push-sender"):
        variables = set(services[name]["environment"])
        assert variables and all(v.startswith("PUSHREC_") for v in variables)
        assert variables <= known, variables - known
    scraped = {
        job["job_name"]
        for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert scraped == {"pushrec-worker", "pushrec-push-sender"}
    # `--scale worker=N`: replicas share the consumer group and the checkpoint set in Redis, and
    # nothing pins one container (a fixed name or a published port would).
    worker = services["worker"]
    assert worker["environment"]["PUSHREC_CHECKPOINT__STORE"] == "redis"
    assert "PUSHREC_CHECKPOINT__NAME" not in worker["environment"]
    assert "container_name" not in worker and "ports" not in worker
    worker_job = next(
        job
        for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
        if job["job_name"] == "pushrec-worker"
    )
    assert "dns_sd_configs" in worker_job  # every replica is scraped
