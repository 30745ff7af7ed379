"""Where an event's time to its list goes: its stages, and the split of the slowest events.

An event's list is late for one of six reasons, each the time between two stamps the worker
takes (wall-clock seconds):

==========  ===========================================================================
``kafka``   record timestamp -> the Faust process read it (producer, broker, fetch)
``pipe``    -> the model process took its micro-batch (queued behind earlier batches)
``learn``   -> its micro-batch was decoded, deduplicated and learned
``wait``    -> its user's list started re-ranking (deferral while the worker catches up)
``rank``    -> the re-ranking of that round ended
``redis``   -> the list was written (the background writer, Redis)
==========  ===========================================================================

:class:`SlowestEvents` keeps the last events' splits and answers the mean split of the slowest
share of them: what to fix when the p99 is too high.

>>> slow = SlowestEvents(size=4, share=0.5)
>>> stamps = np.array([[0.0, 0.01, 0.02, 0.03, 0.03, 0.04, 0.05],   # 50 ms, fast
...                    [0.0, 0.30, 0.31, 0.32, 0.32, 0.33, 0.34]])  # 340 ms: Kafka
>>> slow.add(stamps)
>>> {k: round(v, 2) for k, v in slow.split().items()}
{'total': 0.34, 'kafka': 0.3, 'pipe': 0.01, 'learn': 0.01, 'wait': 0.0, 'rank': 0.01, 'redis': 0.01}
>>> slow.add(np.array([[0.0, 0.0, 0.0, 0.0, 0.9, 0.9, 0.9]]))  # 900 ms deferred
>>> round(slow.split()["wait"], 2)
0.45
"""

from __future__ import annotations

import threading

import numpy as np

STAGES = ("kafka", "pipe", "learn", "wait", "rank", "redis")


class SlowestEvents:
    """The stage split of the last ``size`` events; the mean split of the slowest ``share``.

    Added to by the worker's event loop and read by the /metrics server's thread: one lock
    (a split read while rows were being added once took its slowest rows from an empty slice,
    and the metric read NaN)."""

    def __init__(self, size: int = 20_000, share: float = 0.01) -> None:
        self.share = share
        self._splits = np.zeros((size, 1 + len(STAGES)))  # total, then the stages
        self._next = 0
        self._count = 0
        self._split: dict[str, float] | None = None  # until the next add (a scrape asks per stage)
        self._lock = threading.Lock()

    def add(self, stamps: np.ndarray) -> None:
        """One row per event: its seven stamps in the order of the module's table (record
        timestamp first, list written last). A stage never counts below zero (clocks of the two
        processes and the producer's may differ by a little)."""
        if not len(stamps):
            return
        stages = np.maximum(np.diff(stamps, axis=1), 0.0)
        rows = np.column_stack([stages.sum(axis=1), stages])[-len(self._splits) :]
        with self._lock:
            at = (self._next + np.arange(len(rows))) % len(self._splits)
            self._splits[at] = rows
            self._next = int(at[-1]) + 1
            self._count = min(self._count + len(rows), len(self._splits))
            self._split = None

    def split(self) -> dict[str, float]:
        """The mean total and stage times of the slowest ``share`` of the events kept (zeros
        before the first)."""
        with self._lock:
            if self._split is None:
                count = self._count
                if not count:
                    return dict.fromkeys(("total", *STAGES), 0.0)
                kept = self._splits[:count]
                slowest = max(1, round(self.share * count))
                rows = kept[np.argpartition(kept[:, 0], count - slowest)[count - slowest :]]
                self._split = dict(zip(("total", *STAGES), rows.mean(axis=0).tolist(), strict=True))
            return self._split


def slowest_split(split: dict[str, float]) -> str:
    """One line for :meth:`SlowestEvents.split`: "412 ms = kafka 20 + pipe 3 + ... ms".

    >>> slowest_split({"total": 0.3, "kafka": 0.1, "pipe": 0, "learn": 0.05, "wait": 0.1,
    ...                "rank": 0.03, "redis": 0.02})
    '300 ms = kafka 100 + pipe 0 + learn 50 + wait 100 + rank 30 + redis 20 ms'
    """
    stages = " + ".join(f"{stage} {split[stage] * 1000:.0f}" for stage in STAGES)
    return f"{split['total'] * 1000:.0f} ms = {stages} ms"
