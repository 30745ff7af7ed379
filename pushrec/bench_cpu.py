"""`pushrec bench`'s CPU figure: where the machine's cores went while a measurement ran.

A latency load is a share of the backlog rate, and the worker shares the machine with the broker,
Redis and the bench's own load generator. Whether a tail is the model falling behind or the
machine running out shows in the cores each took: the worker's Faust process, its model process
(learning, ranking), the bench's process (the paced replay and the /metrics scrapes), and how much
of the machine stayed idle. Read from Linux's ``/proc``; elsewhere there is nothing to report.

>>> before = Cpu(at=10.0, seconds={"faust": 1.0, "model": 2.0}, idle_ticks=100, total_ticks=400)
>>> after = Cpu(at=12.0, seconds={"faust": 2.0, "model": 3.9}, idle_ticks=110, total_ticks=800)
>>> used(before, after)
{'faust_cores': 0.5, 'model_cores': 0.95, 'machine_idle_share': 0.025}
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True)
class Cpu:
    """CPU seconds each role's processes have used so far, and the machine's idle and total
    ticks (every core), at monotonic time ``at``."""

    at: float
    seconds: dict[str, float]
    idle_ticks: int
    total_ticks: int


def read(worker_pid: int) -> Cpu | None:
    """The worker's two processes (``faust``: ``worker_pid``; ``model``: its children but
    multiprocessing's resource tracker), this process (``bench``) and the machine; None where
    ``/proc`` cannot say (not Linux, or the worker has gone)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(value) for value in fields]
        seconds = {"faust": _process_seconds(worker_pid), "model": 0.0}
        for child in Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split():
            with contextlib.suppress(OSError):  # (a child that just ended)
                if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                    seconds["model"] += _process_seconds(int(child))
        seconds["bench"] = _process_seconds(os.getpid())
    except (OSError, ValueError, IndexError):
        return None
    # idle and iowait are the 4th and 5th; guest time is counted in user time already.
    return Cpu(time.monotonic(), seconds, ticks[3] + ticks[4], sum(ticks[:8]))


def used(before: Cpu | None, after: Cpu | None) -> dict[str, float]:
    """Cores each role used between the two readings (CPU seconds per second: 1.0 is a whole
    core), and the share of the machine's cores that stayed idle; {} without both readings."""
    if before is None or after is None or after.at <= before.at:
        return {}
    wall = after.at - before.at
    out = {
        f"{role}_cores": round((after.seconds[role] - before.seconds.get(role, 0.0)) / wall, 3)
        for role in after.seconds
    }
    total = after.total_ticks - before.total_ticks
    if total > 0:
        out["machine_idle_share"] = round((after.idle_ticks - before.idle_ticks) / total, 3)
    return out


def _process_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of ``pid`` (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": the name may hold spaces
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14 and 15)
