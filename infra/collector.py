"""Long-lived objects out of the garbage collector's sight.

What a process has built by the time it is ready (its modules, clients and services, the model
it restored) lives as long as the process, yet every full collection scanned it again: each of
the worker's three processes stopped for 40-100 ms at each full collection, two or three times
in a 20-s latency run, and the model process for 0.5-0.7 s at a million users
(docs/benchmarks.md). :func:`freeze_what_lives` collects once and moves every survivor out of
the collector's sight (``gc.freeze``): later collections scan only what was made since.

Reference counting still frees a frozen object; only one that later dies in a reference cycle
stays allocated. What is frozen here is the long-lived part of a process (the checkpoint makes
the same trade for the model's state, ``consumers.recovery``).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("pushrec.gc")


def freeze_what_lives(process: str, generation: int = 2) -> None:
    """Collect ``generation`` (2: every object; 1: only the young ones, for what the process
    has just built, without scanning what is frozen or old again) and freeze every object left."""
    started = time.perf_counter()
    frozen = gc.get_freeze_count()
    gc.collect(generation)
    gc.freeze()
    log.info(
        "the %s process's %d long-lived objects are out of the garbage collector's sight (%d new, %.0f ms)",
        process,
        gc.get_freeze_count(),
        gc.get_freeze_count() - frozen,
        (time.perf_counter() - started) * 1000,
    )
