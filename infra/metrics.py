"""Prometheus metrics: the names dashboards and alerts rely on, in one registry per process."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from infra.latency import STAGES, SlowestEvents
from infra.store import REDIS_ERROR_KINDS, redis_error_kind

# Closed label sets (the product contract, shared/SPEC.md); pre-created so dashboards see zeros.
EVENT_OUTCOMES = ("processed", "dead_letter", "duplicate")
PUSH_OUTCOMES = (
    "sent",
    "capped",
    "deduped",
    "below_threshold",
    "below_recent",
    "quiet_hours",
    "active",
    "holdout",
    "failed",
    "dead_letter",
)
PUSH_ENTRY_RESULTS = ("observed", "already_sent", "outside_segment", "trimmed")
PUSH_TRIGGERS = ("away", "browse", "cart", "replenishment", "price_drop")
PUSH_DECISIONS = ("sent", "capped", "deduped", "below_threshold", "below_recent")
# Quantiles are interpolated within a bucket (histogram_quantile, pushrec bench): with no edge
# between 1 and 2.5 s, any p99 in that range was reported near 2.47 s.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.25,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """Every pushrec metric; each process makes one and passes it to what it runs."""

    def __init__(
        self,
        event_types: tuple[str, ...] = (),
        dead_letter_reasons: tuple[str, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "pushrec_events",
            "Events consumed by the worker, by type and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "pushrec_dead_letters",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.event_to_list = Histogram(
            "pushrec_event_to_list_seconds",
            "From the event's Kafka record timestamp to its user's list written in Redis.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slowest_events = SlowestEvents()
        slowest = Gauge(
            "pushrec_slowest_events_seconds",
            "Mean event-to-list time of the slowest 1 % of the last 20,000 events (stage=total), and "
            "where it went: kafka (record timestamp to its micro-batch read), pipe (to the model "
            "process), learn, wait (deferral before re-ranking), rank, redis (infra/latency.py).",
            ["stage"],
            registry=r,
        )
        for stage in ("total", *STAGES):
            slowest.labels(stage).set_function(partial(self._slowest, stage))
        self.model_update = Histogram(
            "pushrec_model_update_seconds",
            "Time to learn one micro-batch of events.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refused_updates = Counter(
            "pushrec_model_refused_updates",
            "Model updates undone because they would have left a factor non-finite or past its norm "
            "bound (a bad input the codec let through, or a learning rate that diverges).",
            registry=r,
        )
        self.catalogue_items = Counter(
            "pushrec_catalogue_items",
            "Catalogue records by outcome (embedded: new or changed text; unchanged; dead_letter).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("embedded", "unchanged", "dead_letter"):
            self.catalogue_items.labels(outcome)
        self.catalogue_items_stored = Counter(
            "pushrec_catalogue_items_stored",
            "Catalogue items stored in Redis (title, category, price: what a push names).",
            registry=r,
        )
        self.catalogue_items_unstored = Gauge(
            "pushrec_catalogue_items_unstored",
            "Catalogue items taken in but not stored in Redis yet (a large publish is stored a chunk "
            "per list write; lists written meanwhile may name items whose title is not stored yet).",
            registry=r,
        )
        self.list_refreshes = Counter("pushrec_list_refreshes", "Top-N lists written to Redis.", registry=r)
        self.away_lists = Counter(
            "pushrec_away_lists",
            "Of those, lists of shoppers who had left (ranked once more when their visit gap passed on "
            "the stream's clock, for the push sender).",
            registry=r,
        )
        self.loop_lag = Histogram(
            "pushrec_event_loop_lag_seconds",
            "How late a 20 ms timer of each worker process's event loop ran: how long the loop could "
            "run nothing else (the model process learns and ranks a micro-batch without yielding).",
            ["process"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.redis_errors = Counter(
            "pushrec_redis_errors",
            "Redis commands that failed after the client's retries, by kind: connection, timeout, "
            "oom (maxmemory), readonly (a replica), noscript, other.",
            ["kind"],
            registry=r,
        )
        for kind in REDIS_ERROR_KINDS:
            self.redis_errors.labels(kind)
        self.pushes = Counter(
            "pushrec_pushes",
            "What became of pushes: sent (delivered), capped (budget), deduped, below_threshold, "
            "below_recent (under the recent pushes' bar), "
            "quiet_hours (held to their end), active (shopper back before the send), holdout (the "
            "control group's would-be push, not sent), failed, dead_letter.",
            ["outcome"],
            registry=r,
        )
        self.push_decisions = Counter(
            "pushrec_push_decisions",
            "Push decisions by trigger and outcome (sent = held for its send time).",
            ["trigger", "outcome"],
            registry=r,
        )
        for trigger in PUSH_TRIGGERS:
            for decision in PUSH_DECISIONS:
                self.push_decisions.labels(trigger, decision)
        self.push_opens = Counter(
            "pushrec_push_opens",
            "Delivered pushes opened (a push_open event with their push id), by trigger.",
            ["trigger"],
            registry=r,
        )
        self.push_dismissals = Counter(
            "pushrec_push_dismissals",
            "Delivered pushes dismissed (a push_dismiss event with their push id), by trigger.",
            ["trigger"],
            registry=r,
        )
        self.push_conversions = Counter(
            "pushrec_push_conversions",
            "Pushes whose item the shopper clicked, carted or bought within the attribution window "
            "after delivery, by trigger and group (holdout: would-be pushes, the baseline).",
            ["trigger", "group"],
            registry=r,
        )
        self.push_delivered = Counter(
            "pushrec_push_delivered",
            "Pushes delivered (group treated), or withheld at their send time (group holdout), by "
            "trigger: the denominators of open rate and conversions per 1,000.",
            ["trigger", "group"],
            registry=r,
        )
        for trigger in PUSH_TRIGGERS:
            self.push_opens.labels(trigger)
            self.push_dismissals.labels(trigger)
            for group in ("treated", "holdout"):
                self.push_conversions.labels(trigger, group)
                self.push_delivered.labels(trigger, group)
        self.push_due = Gauge(
            "pushrec_push_due",
            "Shoppers (and carts) waiting to be considered for a push once they have left.",
            registry=r,
        )
        self.push_held = Gauge("pushrec_push_held", "Decided pushes waiting for their send time.", registry=r)
        self.push_score_bar = Gauge(
            "pushrec_push_score_bar",
            "The recent bar: the score a push must reach besides min_score (-Inf: none yet, or off).",
            registry=r,
        )
        self.push_retries = Counter(
            "pushrec_push_retries",
            "Deliveries to the push gateway tried again (timeout, connection error, 408, 429, 5xx).",
            registry=r,
        )
        self.push_entries = Counter(
            "pushrec_push_entries",
            "Refresh-stream entries and held pushes by what became of them: observed (the shopper's "
            "activity counted), already_sent (delivered before a crash), outside_segment (a "
            "--segment campaign skipped the user), trimmed (dropped by the stream's cap before any "
            "sender read it: activity lost).",
            ["result"],
            registry=r,
        )
        for result in PUSH_ENTRY_RESULTS:
            self.push_entries.labels(result)
        self.hit_rate = Gauge(
            "pushrec_prequential_hit_rate",
            "Share of recent positive events whose item was in the user's served list (HR@N).",
            registry=r,
        )
        self.visit_hit_rate = Gauge(
            "pushrec_prequential_visit_hit_rate",
            "Share of recent visits (after a shopper's first, with an engagement) in which the shopper "
            "engaged with an item of the list served when the visit began (HR@N as a push is read).",
            registry=r,
        )
        self.index_items = Gauge(
            "pushrec_approximate_index_items",
            "Items in the HNSW index lists come from (0: every item is scored, below "
            "PUSHREC_MODEL__ANN_MIN_ITEMS or while the index is being built).",
            registry=r,
        )
        self.index_pending = Gauge(
            "pushrec_approximate_index_pending_rows",
            "Items whose factors moved since they were indexed and wait for a re-index (from "
            "PUSHREC_MODEL__ANN_PENDING_MAX on, in the background): scored exactly with every list.",
            registry=r,
        )
        self.batch_size = Histogram(
            "pushrec_worker_batch_events",
            "Events per micro-batch.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "pushrec_worker_assigned_partitions",
            "Event-topic partitions this worker owns (0 = not in the group yet).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "pushrec_worker_consumer_lag",
            "Records in this worker's event partitions not learned yet (log end minus next offset).",
            registry=r,
        )
        self.catch_up_lost = Counter(
            "pushrec_catch_up_lost_records",
            "Records the model missed at a restart's catch-up, by cause: retention (deleted before "
            "the model learned them: the checkpoint was older than the topic's retention), "
            "truncated (the group committed offsets past the log's end: the broker lost records).",
            ["cause"],
            registry=r,
        )
        for cause in ("retention", "truncated"):
            self.catch_up_lost.labels(cause)
        self.item_state_lag = Gauge(
            "pushrec_item_state_lag_seconds",
            "Age of the last other worker's item changes when this worker applied them (from "
            "their first learning to here), or how long its reader has been behind the "
            "item-delta topic, whichever is more.",
            registry=r,
        )
        self.item_deltas = Counter(
            "pushrec_item_delta_records",
            "Records of item changes on the item-delta topic: published (by this worker), applied "
            "(another worker's), unreadable (not written by pushrec, passed over).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("published", "applied", "unreadable"):
            self.item_deltas.labels(outcome)
        self.checkpoints = Counter(
            "pushrec_checkpoints",
            "Checkpoints of the worker's model, offsets and dedupe memory, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.checkpoint_time = Gauge(
            "pushrec_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last checkpoint saved (0 = none yet).",
            registry=r,
        )
        for result in ("ok", "failed"):
            self.checkpoints.labels(result)
        for kind in event_types:
            for outcome in EVENT_OUTCOMES:
                self.events.labels(kind, outcome)
        for reason in dead_letter_reasons:
            self.dead_letters.labels(reason)
        for outcome in PUSH_OUTCOMES:
            self.pushes.labels(outcome)

    def _slowest(self, stage: str) -> float:
        return self.slowest_events.split()[stage]

    def redis_error(self, exc: BaseException) -> str:
        """Count a Redis error under its kind; the kind, for the log line."""
        kind = redis_error_kind(exc)
        self.redis_errors.labels(kind).inc()
        return kind

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def watch_cpu(self, processes: Mapping[str, int]) -> None:
        """Report the CPU time of these processes (name -> pid) as
        ``pushrec_process_cpu_seconds_total{process}``, read at each scrape (Linux)."""
        self.registry.register(ProcessCpu(processes))


class ProcessCpu(Collector):
    """``pushrec_process_cpu_seconds_total{process}``: user plus system CPU time of each named
    process, every thread, from ``/proc`` at each scrape; its rate is the cores the process uses.
    The worker's model process serves it for the worker's processes (``model``, ``faust``,
    ``lists``: the list store): a model near one core is the worker's ceiling, and the three
    together near the machine's cores mean the machine is full. A process that has ended, or a system without
    ``/proc``, has no sample."""

    def __init__(self, processes: Mapping[str, int]) -> None:
        self.processes = dict(processes)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pushrec_process_cpu_seconds",
            "CPU time (user + system, every thread) of a pushrec process; rate() = cores in use.",
            labels=["process"],
        )
        for name, pid in self.processes.items():
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                family.add_metric([name], seconds)
        yield family


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of every thread of process ``pid`` so far (Linux's
    ``/proc/<pid>/stat``); None where that cannot be read (an ended process, another system)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) ": a name may hold spaces
        return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime and stime, fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Samples of a /metrics endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
        return samples_of(response.read().decode())


def samples_of(text: str) -> Samples:
    """The samples of a /metrics page's ``text``, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in samples.items()
        if n == name and all(dict(lab).get(k) == val for k, val in labels.items())
    )
