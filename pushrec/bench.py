"""`pushrec bench`: the real pipeline's throughput and latency against Faust's own ceiling,
measured in one run on the same machine, broker and events.

1. ceiling: the events are produced to fresh topics first, then a trivial Faust agent
   (``pushrec.bench_agent``: the worker's micro-batching and codec, nothing else) consumes them;
   rate = events / (last decoded - first decoded).
2. pipeline: the same events to fresh topics, then ``pushrec worker`` consumes the backlog (decode,
   dedupe, learn, re-rank, Redis write, checkpoints as configured); rate = events counted between
   the first sighting of a count and the last event / that interval, from its /metrics, polled
   every 0.25 s. A backlog is consumed as fast as the worker can: that rate is its maximum
   sustainable rate. Peak RSS is the VmHWM of the worker's processes (Faust, model and
   multiprocessing's resource tracker), summed.
3. latency: for each of ``loads`` (and ``fraction``, the headline), a fresh worker, then the
   events replayed at that share of the pipeline rate; p50/p99/p99.9 of event-to-list (record
   timestamp to Redis write), interpolated within the worker's histogram buckets.
   Steps 2 and 3 also say where the machine's cores went meanwhile (``pushrec.bench_cpu``) and,
   for 3, how many lists the worker ranked and wrote per event.
4. evaluate: `pushrec evaluate`'s speed for the product model alone on the same events.

With a catalogue (``items``), a shop's case: before step 2 a worker takes the catalogue in from
the items topic, stores it in Redis and stops, and the backlog's worker restores it from that
worker's checkpoint; before the paced events of step 3, the latency worker takes it in and
stores it (a one-off of the publish that costs seconds at 55k items); step 4 announces it.

With ``repeat`` > 1, steps 1 and 2 run as that many (ceiling, pipeline) pairs and the pair with
the median ratio is reported (every pair is in ``pairs``): on a shared machine the speed drifts
between runs, and a ceiling measured minutes away from its pipeline says little about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from infra.kafka import KafkaAccess
from infra.latency import STAGES, slowest_split
from infra.metrics import Samples, metric_sum, scrape
from infra.settings import Settings
from infra.stack import EmbeddedStack, free_port
from pushrec import bench_cpu
from pushrec.demo import SAMPLE_EVENTS, stop_process, wait_for
from stream.replay import Pacing, Replayer, ReplaySummary, read_lines
from stream.topics import TopicNames, ensure_topics

SHARED_TAOBAO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "taobao" / "events.jsonl.gz"
COUNTED = ("processed", "duplicate", "dead_letter")


def default_events() -> Path:
    return SHARED_TAOBAO if SHARED_TAOBAO.exists() else SAMPLE_EVENTS


def load_lines(path: Path, limit: int) -> list[bytes]:
    """The first ``limit`` lines; a shorter log is repeated with fresh ids (the sample scaled up)."""
    base = [line for _, line in read_lines(path)]
    out: list[bytes] = []
    copy = 0
    while len(out) < limit and base:
        for line in base[: limit - len(out)]:
            if copy:
                event = json.loads(line)
                event["event_id"] += f"~{copy}"
                event["user_id"] += f"~{copy}"
                line = json.dumps(event).encode()
            out.append(line)
        copy += 1
    return out


def quantile(samples: Samples, name: str, q: float) -> float:
    """``q``-quantile of a Prometheus histogram, linear within its bucket (as histogram_quantile)."""
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (n, labels), value in samples.items() if n == f"{name}_bucket"
    )
    total = buckets[-1][1]
    if not total:
        return float("nan")
    rank, lower_bound, lower_count = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(
                count - lower_count, 1e-12
            )
        lower_bound, lower_count = bound, count
    return lower_bound


class Run:
    """Fresh topic names, consumer group and key prefix for one measurement."""

    def __init__(self, base_env: dict[str, str], workdir: Path, name: str) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:6]}{name}"
        self.workdir = workdir
        self.env = {
            **base_env,
            "PUSHREC_KAFKA__TOPIC_PREFIX": self.prefix,
            "PUSHREC_KAFKA__CONSUMER_GROUP": f"{self.prefix}-worker",
            "PUSHREC_REDIS__KEY_PREFIX": f"{self.prefix}:",
        }

    def spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )


def _progress(samples: Samples) -> tuple[float, bool]:
    """Events the worker has counted, and whether every learned event's list is written (from
    its /metrics' ``samples``)."""
    counted = sum(metric_sum(samples, "pushrec_events_total", outcome=o) for o in COUNTED)
    processed = metric_sum(samples, "pushrec_events_total", outcome="processed")
    return counted, metric_sum(samples, "pushrec_event_to_list_seconds_count") >= processed


def _peak_rss(pid: int) -> int:
    """VmHWM of the process plus that of its child processes (the worker's model process and
    multiprocessing's resource tracker): the sum of each process's own peak, an upper bound of
    their peak together."""
    total = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += _peak_rss(int(child))
    return total


@contextlib.contextmanager
def producer(kafka: KafkaAccess, settings: Settings, run: Run) -> Iterator[Replayer]:
    """A replayer to ``run``'s topics, created first if need be."""
    names = TopicNames(run.prefix)
    ensure_topics(kafka, names.all, settings.kafka.partitions, settings.kafka.replication_factor)
    replayer = Replayer(kafka, names, settings.events.limits)
    try:
        yield replayer
    finally:
        replayer.close()


def replay(kafka: KafkaAccess, settings: Settings, run: Run, events: Path, pacing: Pacing) -> None:
    """``events`` (JSON Lines) to ``run``'s topics."""
    with producer(kafka, settings, run) as replayer:
        replayer.replay(events, pacing=pacing, progress=False)


def take_in_catalogue(
    kafka: KafkaAccess,
    settings: Settings,
    run: Run,
    items: Path,
    port: int,
    worker: subprocess.Popen[bytes],
) -> int:
    """Publish the catalogue ``items`` to ``run``'s items topic and wait until the worker
    serving /metrics on ``port`` has taken in every item (embedded, unchanged or dead-lettered)
    and stored them in Redis; returns how many were published."""
    summary = ReplaySummary()
    with producer(kafka, settings, run) as replayer:
        replayer.replay_items(items, summary)
        replayer.flush()

    def taken_in() -> bool:  # (embedded and stored: two paths, in either order)
        samples = scrape(port)
        counted = metric_sum(samples, "pushrec_catalogue_items_total") >= summary.items_sent
        stored = metric_sum(samples, "pushrec_catalogue_items_stored_total") >= summary.items_sent
        return counted and stored and not metric_sum(samples, "pushrec_catalogue_items_unstored")

    # Stored in Redis too: storing tens of thousands of items slows the worker for seconds, a
    # one-off of the publish that a steady rate's latency would otherwise take in.
    wait_for(
        f"the worker to take in and store the {summary.items_sent:,} catalogue items", taken_in, 600, worker
    )
    return summary.items_sent


class Backlog(NamedTuple):
    """What :func:`measure_backlog` measured."""

    events_per_s: float
    peak_rss_bytes: int
    cpu: dict[str, float]  # cores used over the same interval (``bench_cpu.used``)
    lists_per_event: float  # lists ranked and written per event learned


def measure_backlog(
    run: Run, n: int, prepare: Callable[[int, subprocess.Popen[bytes]], None] | None = None
) -> Backlog:
    """Start ``pushrec worker`` for ``run`` and time how fast it takes in ``n`` events (a backlog
    on its topics, or one ``prepare(metrics port, worker)`` produces once the worker is ready).
    Events/s: counted between the first sighting of a count and the last event's list, from its
    /metrics polled every 0.25 s (scraping costs the worker CPU: at 50 ms it was 9 % of its
    samples)."""
    port = free_port()
    log_name = f"{run.prefix}-pipeline.log"
    worker = run.spawn("pushrec.cli", "worker", "--metrics-port", str(port), log=log_name)
    # (time, events counted, cores read) of a sighting: when counting started, and the one before
    # it, while nothing was counted yet; and the last one
    first: tuple[float, float, bench_cpu.Cpu | None] | None = None
    previous: tuple[float, float, bench_cpu.Cpu | None] | None = None
    last: tuple[float, float, bench_cpu.Cpu | None] | None = None
    peak = 0
    try:
        if prepare is not None:
            prepare(port, worker)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited: see {run.workdir / log_name}")
            peak = max(peak, _peak_rss(worker.pid))
            with contextlib.suppress(OSError):
                samples = scrape(port)
                counted, lists_written = _progress(samples)
                sighting = (time.time(), counted, bench_cpu.read(samples))
                if counted > 0 and first is None:
                    # Everything counted at the first sighting (a short log on a fast machine):
                    # count from the sighting before, when nothing was.
                    first = sighting if counted < n or previous is None else previous
                elif counted == 0:
                    previous = sighting
                if counted >= n and lists_written:  # the last deferred re-rank included
                    last = sighting
                    lists = lists_per_event(samples)
                    break
            time.sleep(0.25)
        else:
            raise RuntimeError("the pipeline did not finish within 30 minutes")
    finally:
        peak = max(peak, _peak_rss(worker.pid))
        stop_process(worker)
    assert first is not None and last is not None
    # Only what was counted after the first sighting ran in the measured interval.
    rate = (n - first[1]) / max(last[0] - first[0], 1e-9)
    return Backlog(rate, peak, bench_cpu.used(first[2], last[2]), lists)


def lists_per_event(samples: Samples) -> float:
    """Lists the worker ranked and wrote per event it learned, from its /metrics."""
    processed = metric_sum(samples, "pushrec_events_total", outcome="processed")
    return round(metric_sum(samples, "pushrec_list_refreshes_total") / max(processed, 1.0), 3)


def cpu_split(cores: dict[str, float]) -> str:
    """``bench_cpu.used`` in a line: "cores: model 0.93, faust 0.45, bench 0.12; machine idle 3%"."""
    if not cores:
        return "cores: not measured (no /proc)"
    roles = ", ".join(
        f"{key.removesuffix('_cores')} {value:.2f}" for key, value in cores.items() if key.endswith("_cores")
    )
    idle = cores.get("machine_idle_share")
    return f"cores: {roles}" + (f"; machine idle {idle:.0%}" if idle is not None else "")


@contextlib.contextmanager
def servers(settings: Settings, workdir: Path) -> Iterator[dict[str, str]]:
    """The configured Kafka/Redis, else an embedded stack for the duration of the bench."""
    if settings.kafka_bootstrap and settings.redis_url:
        yield {"PUSHREC_STATE_DIR": str(workdir / "state")}
        return
    stack = EmbeddedStack(workdir / "stack")
    state = stack.up()
    try:
        yield {
            "PUSHREC_KAFKA_BOOTSTRAP": state.kafka_bootstrap,
            "PUSHREC_REDIS_URL": state.redis_url,
            "PUSHREC_STATE_DIR": str(workdir / "state"),
        }
    finally:
        stack.down()


def run_bench(
    settings: Settings,
    events: Path,
    limit: int,
    fraction: float,
    log: Any,
    memory_users: tuple[int, int] = (10_000, 50_000),
    repeat: int = 3,
    checkpoint_users: tuple[int, ...] = (100_000, 1_000_000),
    checkpoint_partitions: int = 6,
    loads: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9),
    items: Path | None = None,
) -> dict[str, Any]:
    """The figures above; with ``items`` (a catalogue, JSON Lines), every worker has taken it in
    before the events come, and ``evaluate`` is given it."""
    workdir = Path(tempfile.mkdtemp(prefix="pushrec-bench-"))
    lines = load_lines(events, limit)
    log_path = workdir / "events.jsonl"
    log_path.write_bytes(b"\n".join(lines) + b"\n")
    parsed = [json.loads(line) for line in lines]
    users = len({e["user_id"] for e in parsed})
    n_items = len({e["item_id"] for e in parsed})
    n = len(lines)
    with servers(settings, workdir) as server_env:
        base_env = {**os.environ, **server_env}

        bootstrap = server_env.get("PUSHREC_KAFKA_BOOTSTRAP") or settings.kafka_bootstrap
        kafka = KafkaAccess.from_settings(settings, str(bootstrap))

        def produce(run: Run, pacing: Pacing) -> None:
            replay(kafka, settings, run, log_path, pacing)

        catalogue = 0  # items published to each run (with ``items``)

        def catalogue_first(run: Run) -> None:
            """A worker takes in the catalogue and stops: the next one restores it from the
            checkpoint written at the stop, as a shop's worker does after a restart."""
            nonlocal catalogue
            assert items is not None
            port = free_port()
            worker = run.spawn(
                "pushrec.cli", "worker", "--metrics-port", str(port), log=f"{run.prefix}-catalogue.log"
            )
            try:
                catalogue = take_in_catalogue(kafka, settings, run, items, port, worker)
            finally:
                stop_process(worker, timeout_s=120)

        log(
            f"bench: {n:,} events from {events} ({users:,} users, {n_items:,} items"
            + (f"; the catalogue {items} published first" if items is not None else "")
            + f"); work dir {workdir}"
        )

        def ceiling_rate() -> float:
            run = Run(base_env, workdir, "c")
            produce(run, Pacing())
            out = workdir / f"ceiling-{run.prefix}.json"
            agent = run.spawn("pushrec.bench_agent", str(n), str(out), log=f"{run.prefix}-ceiling.log")
            try:
                wait_for("the trivial agent to decode every event", out.exists, 600, agent)
            finally:
                stop_process(agent)
            seen = json.loads(out.read_text())
            return seen["count"] / max(seen["last"] - seen["first"], 1e-9)

        def pipeline_rate() -> Backlog:
            """The worker on a backlog."""
            run = Run(base_env, workdir, "p")
            if items is not None:
                catalogue_first(run)
            produce(run, Pacing())
            return measure_backlog(run, n)

        # 1 and 2, in pairs: this machine's speed drifts between runs, so each pipeline rate is
        # compared with the ceiling measured just before it.
        pairs = []
        peak = 0
        for k in range(repeat):
            ceiling = ceiling_rate()
            backlog = pipeline_rate()
            pipeline = backlog.events_per_s
            peak = max(peak, backlog.peak_rss_bytes)
            pairs.append(
                {
                    "ceiling": round(ceiling, 1),
                    "pipeline": round(pipeline, 1),
                    "ratio": round(pipeline / ceiling, 3),
                    "pipeline_cpu": backlog.cpu,
                    "pipeline_lists_per_event": backlog.lists_per_event,
                }
            )
            log(
                f"pair {k + 1}/{repeat}: ceiling (trivial Faust agent) {ceiling:,.0f} events/s, "
                f"pipeline {pipeline:,.0f} events/s, ratio {pipeline / ceiling:.2f}; "
                f"worker peak RSS {backlog.peak_rss_bytes / 2**20:,.0f} MiB; "
                f"{backlog.lists_per_event:.2f} lists per event; {cpu_split(backlog.cpu)}"
            )
        median = sorted(pairs, key=lambda p: p["ratio"])[(len(pairs) - 1) // 2]
        ceiling, pipeline = median["ceiling"], median["pipeline"]

        # 3. Latency at fractions of that rate (the headline one is ``fraction``).
        def latency_at(share: float) -> dict[str, float]:
            run = Run(base_env, workdir, "l")
            rate = share * pipeline
            port = free_port()
            worker = run.spawn(
                "pushrec.cli", "worker", "--metrics-port", str(port), log=f"latency-{share}.log"
            )
            try:
                wait_for(
                    "the latency worker to join",
                    lambda: metric_sum(scrape(port), "pushrec_worker_assigned_partitions") > 0,
                    120,
                    worker,
                )
                if items is not None:
                    take_in_catalogue(kafka, settings, run, items, port, worker)
                before = bench_cpu.read(scrape(port))
                produce(run, Pacing(rate=rate))
                wait_for(  # and every list written: the histogram then holds every event's latency
                    "every paced event's list",
                    lambda: (lambda counted, written: counted >= n and written)(*_progress(scrape(port))),
                    600,
                    worker,
                )
                samples = scrape(port)
                cores = bench_cpu.used(before, bench_cpu.read(samples))
            finally:
                stop_process(worker)
            load = {"fraction": share, "rate_events_per_s": round(rate, 1)}
            for key, q in (("p50_s", 0.5), ("p99_s", 0.99), ("p999_s", 0.999)):
                load[key] = round(quantile(samples, "pushrec_event_to_list_seconds", q), 4)
            load["slowest_s"] = {  # where the slowest 1 % of the events' time went
                stage: round(metric_sum(samples, "pushrec_slowest_events_seconds", stage=stage), 4)
                for stage in ("total", *STAGES)
            }
            load["lists_per_event"] = lists_per_event(samples)
            load["cpu"] = cores
            log(
                f"latency at {share:.0%} ({rate:,.0f} events/s): p50 {load['p50_s'] * 1000:.0f} ms, "
                f"p99 {load['p99_s'] * 1000:.0f} ms, p99.9 {load['p999_s'] * 1000:.0f} ms; "
                f"slowest 1 %: {slowest_split(load['slowest_s'])}; "
                f"{load['lists_per_event']:.2f} lists per event; {cpu_split(cores)}"
            )
            return load

        by_load = [latency_at(share) for share in sorted({*loads, fraction})]
        headline = next(load for load in by_load if load["fraction"] == fraction)
        p50, p99, rate = headline["p50_s"], headline["p99_s"], headline["rate_events_per_s"]

    # 4. evaluate's speed for the product model on the same events.
    from consumers.worker import build_recommender
    from online_models.evaluation import evaluate
    from pushrec.bench_memory import model_memory
    from stream.events import decode_event

    model = build_recommender(settings)
    if items is not None:
        from pushrec.commands.evaluate import announce_items

        announce_items(items, [model], settings)
    report = evaluate([decode_event(line) for line in lines], {"pushrec": model})
    evaluate_rate = report.models["pushrec"]["events_per_s"]
    memory = model_memory(settings, memory_users)
    log(f"model memory: {memory['bytes_per_user']:,} B/user, {memory['bytes_per_item']:,} B/item")
    from pushrec.bench_checkpoint import checkpoint_costs

    checkpoints = {}
    with servers(settings, workdir) as server_env:  # Redis, for a checkpoint's save to it
        redis_url = server_env.get("PUSHREC_REDIS_URL") or settings.redis_url
        for size in checkpoint_users:
            cost = checkpoint_costs(settings, size, checkpoint_partitions, log=log, redis_url=redis_url)
            checkpoints[str(size)] = cost
            log(
                f"checkpoint at {size:,} users in {checkpoint_partitions} partitions: longest stall "
                f"{cost['longest_stall_s'] * 1000:,.0f} ms (the whole checkpoint "
                f"{cost['checkpoint_total_s']:.1f} s, {cost['events_learned_meanwhile']:,} events "
                f"learned meanwhile); saved to Redis: longest stall {cost['redis_save_stall_s'] * 1000:,.0f} "
                f"ms ({cost['redis_save_s']:.1f} s); a partition restored "
                f"in {cost['partition_restore_s'] * 1000:,.0f} ms"
            )
    with contextlib.suppress(OSError):
        for child in workdir.iterdir():
            if child.suffix == ".jsonl":
                child.unlink()
    return {
        "events": n,
        "pipeline_events_per_s": round(pipeline, 1),
        "ceiling_events_per_s": round(ceiling, 1),
        "ratio": median["ratio"],
        "pairs": pairs,
        "latency_p50_s": round(p50, 4),
        "latency_p99_s": round(p99, 4),
        "latency_rate_events_per_s": round(rate, 1),
        "latency_by_load": by_load,
        "evaluate_events_per_s": round(evaluate_rate, 1),
        "worker_peak_rss_bytes": peak,
        "users": users,
        "items": n_items,
        "catalogue": str(items) if items is not None else None,
        "catalogue_items": catalogue,
        **memory,
        "checkpoints": checkpoints,
        "source": str(events),
        "logs": str(workdir),
    }
