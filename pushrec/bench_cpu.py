"""`pushrec bench`'s CPU figure: where the machine's cores went while a measurement ran.

A latency load is a share of the backlog rate, and the worker shares the machine with the broker,
Redis and the bench's own load generator. Whether a tail is the model falling behind or the
machine running out shows in the cores each took: the worker's Faust and model processes (as its
``pushrec_process_cpu_seconds_total`` says), the bench's process (the paced replay and the
/metrics scrapes), and how much of the machine stayed idle. Linux only (``/proc``); elsewhere
there is nothing to report.

>>> before = Cpu(at=10.0, seconds={"faust": 1.0, "model": 2.0}, idle_ticks=100, total_ticks=400)
>>> after = Cpu(at=12.0, seconds={"faust": 2.0, "model": 3.9}, idle_ticks=110, total_ticks=800)
>>> used(before, after)
{'faust_cores': 0.5, 'model_cores': 0.95, 'machine_idle_share': 0.025}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from infra.metrics import Samples, process_cpu_seconds


@dataclass(frozen=True)
class Cpu:
    """CPU seconds each process has used so far, and the machine's idle and total ticks (every
    core), at monotonic time ``at``."""

    at: float
    seconds: dict[str, float]
    idle_ticks: int
    total_ticks: int


def read(worker: Samples) -> Cpu | None:
    """Now: the worker's processes' CPU seconds from its /metrics (``worker``, just scraped),
    this process's (``bench``) and the machine's ticks; None where they cannot be had."""
    seconds = {
        dict(labels)["process"]: value
        for (name, labels), value in worker.items()
        if name == "pushrec_process_cpu_seconds_total"
    }
    own = process_cpu_seconds(os.getpid())
    try:
        ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    if not seconds or own is None or len(ticks) < 8:
        return None
    # idle and iowait are the 4th and 5th; guest time is counted in user time already.
    return Cpu(time.monotonic(), {**seconds, "bench": own}, ticks[3] + ticks[4], sum(ticks[:8]))


def used(before: Cpu | None, after: Cpu | None) -> dict[str, float]:
    """Cores each process used between the two readings (CPU seconds per second: 1.0 is a
    whole core), and the share of the machine's cores that stayed idle; {} without both."""
    if before is None or after is None or after.at <= before.at:
        return {}
    wall = after.at - before.at
    out = {
        f"{process}_cores": round((after.seconds[process] - before.seconds.get(process, 0.0)) / wall, 3)
        for process in after.seconds
    }
    total = after.total_ticks - before.total_ticks
    if total > 0:
        out["machine_idle_share"] = round((after.idle_ticks - before.idle_ticks) / total, 3)
    return out
