"""`pushrec bench` runs end to end on real servers and reports every figure the product contract
(shared/SPEC.md, beside the repository) names.

No timing assertion: the machines are shared and noisy; the benchmark is the measurement.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from infra.latency import STAGES, SlowestEvents
from infra.metrics import LATENCY_BUCKETS, Metrics, samples_of
from pushrec import bench_cpu
from pushrec.bench import cpu_split, quantile
from pushrec.demo import SAMPLE_EVENTS, SAMPLE_ITEMS
from tests.conftest import Hermetic

pytestmark = pytest.mark.integration

SPEC_KEYS = {
    "events",
    "pipeline_events_per_s",
    "ceiling_events_per_s",
    "ratio",
    "latency_p50_s",
    "latency_p99_s",
    "evaluate_events_per_s",
    "worker_peak_rss_bytes",
    "users",
    "items",
}


def bench(hermetic: Hermetic, *args: str) -> dict[str, Any]:
    """``pushrec bench --events SAMPLE_EVENTS *args --json`` on the test's servers: its report."""
    result = subprocess.run(
        [sys.executable, "-m", "pushrec.cli", "bench", "--events", str(SAMPLE_EVENTS), *args, "--json"],
        env=hermetic.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_bench_reports_every_figure(hermetic: Hermetic) -> None:
    report = bench(
        hermetic,
        *("--events-max", "4000", "--memory-users", "500", "1500", "--repeat", "2", "--loads", "0.6"),
        *("--checkpoint-users", "3000", "--checkpoint-partitions", "3"),
    )
    assert set(report) >= SPEC_KEYS
    assert report["events"] == 4000  # the 3,000-line sample, scaled up with fresh ids
    assert report["users"] > 0 and report["items"] > 0
    for key in (
        "pipeline_events_per_s",
        "ceiling_events_per_s",
        "evaluate_events_per_s",
        "worker_peak_rss_bytes",
    ):
        assert report[key] > 0, key
    assert report["ratio"] == pytest.approx(
        report["pipeline_events_per_s"] / report["ceiling_events_per_s"], rel=0.01
    )
    # Two (ceiling, pipeline) pairs; the reported one is the pair with the median (here: lower) ratio.
    assert len(report["pairs"]) == 2
    assert report["ratio"] == min(p["ratio"] for p in report["pairs"])
    assert report["ceiling_events_per_s"] in {p["ceiling"] for p in report["pairs"]}
    assert 0 < report["latency_p50_s"] <= report["latency_p99_s"]
    # Latency at every load asked for, and at the headline --fraction (0.5 by default).
    loads = {load["fraction"]: load for load in report["latency_by_load"]}
    assert sorted(loads) == [0.5, 0.6]
    assert all(0 < load["p50_s"] <= load["p99_s"] <= load["p999_s"] for load in loads.values())
    assert loads[0.5]["p99_s"] == report["latency_p99_s"]
    for load in loads.values():  # where the slowest events' time went, stage by stage
        split = load["slowest_s"]
        # The slowest 1 %'s mean is at least the true p99, which is at least the lower edge of the
        # histogram bucket the reported (interpolated) p99 falls in: between 1 and 2.5 s the
        # interpolation alone can put it at twice the true value.
        p99_floor = max(edge for edge in (0.0, *LATENCY_BUCKETS) if edge < load["p99_s"])
        assert split["total"] >= p99_floor and split["learn"] > 0 and split["rank"] > 0, (split, load)
        assert sum(split[stage] for stage in STAGES) == pytest.approx(split["total"], abs=1e-3)
        assert 0 < load["lists_per_event"] <= 2  # (a list per event, and one when the shopper left)
    assert all(0 < p["pipeline_lists_per_event"] <= 2 for p in report["pairs"])
    # Where the cores went, read from /proc. While events are paced, the worker's two processes and
    # the bench's own (the replay) all work; on a backlog (produced before the worker started) the
    # model does, and the others may not have used a clock tick in its second.
    for cores in [load["cpu"] for load in loads.values()]:
        assert cores["faust_cores"] > 0 and cores["model_cores"] > 0 and cores["bench_cores"] > 0, cores
    for cores in [load["cpu"] for load in loads.values()] + [p["pipeline_cpu"] for p in report["pairs"]]:
        assert cores["model_cores"] > 0 and min(cores.values()) >= 0, cores
        assert cores["machine_idle_share"] <= 1, cores
    assert report["bytes_per_user"] > 0 and report["bytes_per_item"] > 0
    checkpoint = report["checkpoints"]["3000"]
    assert checkpoint["partitions"] == 3
    assert (
        checkpoint["partition_restore_s"] > 0
        and 0 < checkpoint["longest_stall_s"] <= checkpoint["checkpoint_total_s"]
    )
    assert checkpoint["partition_bytes"] > 0
    assert 0 < checkpoint["redis_save_stall_s"] <= checkpoint["redis_save_s"]


def test_with_a_catalogue_every_worker_takes_it_in_before_the_events(hermetic: Hermetic) -> None:
    """``--items-file``: the backlog's worker restores the catalogue a first worker took in (from
    its checkpoint, not from the items topic again), and the latency worker takes it in before
    the paced events."""
    report = bench(
        hermetic,
        *("--items-file", str(SAMPLE_ITEMS), "--events-max", "3000", "--memory-users", "500", "1000"),
        *("--repeat", "1", "--loads", "0.5", "--checkpoint-users", "1000", "--checkpoint-partitions", "2"),
    )
    assert report["catalogue"] == str(SAMPLE_ITEMS) and report["catalogue_items"] == 1179
    assert report["pipeline_events_per_s"] > 0 and report["evaluate_events_per_s"] > 0
    logs = Path(report["logs"])
    (backlog,) = logs.glob("*-pipeline.log")
    text = backlog.read_text()
    assert "restored the item state" in text and ": 1179 items" in text, text[-2000:]
    assert "catalogue:" not in text  # not taken in again
    latency = (logs / "latency-0.5.log").read_text()
    embedded = sum(int(n) for n in re.findall(r"catalogue: \d+ item\(s\), (\d+) embedded", latency))
    assert embedded == 1179, latency[-2000:]


def test_cpu_of_a_process_that_has_gone_is_not_measured() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    metrics = Metrics()
    metrics.watch_cpu({"model": os.getpid(), "faust": gone.pid})
    samples = samples_of(generate_latest(metrics.registry).decode())
    cpu = {key for key in samples if key[0] == "pushrec_process_cpu_seconds_total"}
    assert cpu == {("pushrec_process_cpu_seconds_total", (("process", "model"),))}
    assert bench_cpu.read({}) is None  # a worker that reports none
    assert bench_cpu.used(None, bench_cpu.read(samples)) == {}
    assert cpu_split({}) == "cores: not measured (no /proc)"


def test_the_slowest_events_split_read_while_events_are_added_is_never_nan() -> None:
    """/metrics reads the split on its own thread while the event loop adds to it (a scrape that
    came mid-add once read NaN for every stage)."""
    slowest, splits, done = SlowestEvents(size=100_000), [], threading.Event()

    def scrape() -> None:
        while not done.is_set():
            splits.append(slowest.split())

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often, as under a loaded worker
    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        rng = np.random.default_rng(0)
        for _ in range(5_000):
            slowest.add(np.cumsum(rng.random((int(rng.integers(1, 5)), 1 + len(STAGES))), axis=1))
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(switch)
    assert len(splits) > 100
    assert all(np.isfinite(list(split.values())).all() for split in splits)


def test_histogram_quantile_interpolates_within_buckets() -> None:
    samples = {
        ("x_bucket", (("le", "0.1"),)): 50.0,
        ("x_bucket", (("le", "0.2"),)): 90.0,
        ("x_bucket", (("le", "0.5"),)): 100.0,
        ("x_bucket", (("le", "+Inf"),)): 100.0,
    }
    assert quantile(samples, "x", 0.5) == pytest.approx(0.1)
    assert quantile(samples, "x", 0.7) == pytest.approx(0.15)
    assert quantile(samples, "x", 0.95) == pytest.approx(0.35)


def test_a_terminated_bench_stops_the_servers_it_started(tmp_path: Path) -> None:
    """SIGTERM (``timeout``, ``kill``) stops the bench as Ctrl-C does: the embedded broker and
    Valkey it started go down with it, instead of running on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHREC_")}  # no servers given
    env["PUSHREC_STATE_DIR"] = str(tmp_path)
    bench = subprocess.Popen(
        [sys.executable, "-m", "pushrec.cli", "bench", "--events", str(SAMPLE_EVENTS), "--repeat", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bench.stderr is not None
        started = next(line for line in bench.stderr if "work dir" in line)  # the servers are up
        workdir = Path(started.rsplit("work dir ", 1)[1].strip())
        state = json.loads((workdir / "stack" / "stack.json").read_text())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
    for pid in (state["broker_pid"], state["valkey_pid"]):
        assert not Path(f"/proc/{pid}").exists(), f"server {pid} still running"
