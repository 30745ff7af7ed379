"""How long an event loop could not run anything else: a task that sleeps a short interval and
measures how late it wakes (what Node's ``monitorEventLoopDelay`` measures, and asyncio's
``slow_callback_duration`` warns of in debug mode only). Each process of a worker runs one; the
lags go to ``pushrec_event_loop_lag_seconds{process}`` and blocks past a threshold are logged,
at most once per report interval, as a count and the longest.

>>> import asyncio, time
>>> lags = []
>>> async def blocked():
...     watch = LoopWatch("test", lags.append, block_s=0.05, interval_s=0.01)
...     task = asyncio.create_task(watch.run())
...     await asyncio.sleep(0.03)
...     time.sleep(0.1)  # the loop can run nothing meanwhile
...     await asyncio.sleep(0.03)
...     task.cancel()
>>> asyncio.run(blocked())
>>> max(lags) >= 0.05
True
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("pushrec.loop")


class LoopWatch:
    """Measures one event loop's lag every ``interval_s`` and hands each to ``observe``."""

    def __init__(
        self,
        process: str,
        observe: Callable[[float], object],
        block_s: float,
        interval_s: float = 0.02,
        report_s: float = 60.0,
    ) -> None:
        """``block_s``: a lag at least this long is a block worth logging (0: none logged);
        ``report_s``: blocks are logged at most this often, summed."""
        self.process = process
        self.observe = observe
        self.block_s = block_s
        self.interval_s = interval_s
        self.report_s = report_s
        self.blocks = 0  # blocks since the last report
        self.longest = 0.0
        self._reported_at = time.monotonic()

    async def run(self) -> None:
        """Until cancelled (the process stopping), which reports the blocks not reported yet: a
        run shorter than ``report_s`` would otherwise log none of them."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                await asyncio.sleep(self.interval_s)
                self.note(max(0.0, loop.time() - started - self.interval_s))
        finally:
            self.report()

    def note(self, lag: float) -> None:
        """One measured lag: observed, and counted (then logged) if it is a block."""
        self.observe(lag)
        if self.block_s and lag >= self.block_s:
            self.blocks += 1
            self.longest = max(self.longest, lag)
        if time.monotonic() - self._reported_at >= self.report_s:
            self.report()

    def report(self) -> None:
        """Log the blocks since the last report, if any: how many and the longest."""
        now = time.monotonic()
        if self.blocks:
            log.warning(
                "the %s process's event loop was blocked %d time(s) for %.0f ms or more in the last "
                "%.0f s, the longest %.0f ms (pushrec_event_loop_lag_seconds)",
                self.process,
                self.blocks,
                self.block_s * 1000,
                now - self._reported_at,
                self.longest * 1000,
            )
            self.blocks, self.longest, self._reported_at = 0, 0.0, now
