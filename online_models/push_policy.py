"""The push policy: whether a refreshed list becomes a notification, and with which item.

>>> policy = PushPolicy(max_per_window=1, cap_window_s=3600, dedupe_window_s=86400)
>>> policy.decide(["a", "b"], now=100.0, recent_pushes=[], last_pushed={"a": 50.0})
Decision(outcome='sent', item='b')
>>> policy.decide(["a", "b"], now=100.0, recent_pushes=[90.0], last_pushed={})
Decision(outcome='capped', item=None)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SENT, CAPPED, DEDUPED, QUIET_HOURS = "sent", "capped", "deduped", "quiet_hours"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str
    item: str | None


@dataclass(frozen=True, slots=True)
class PushPolicy:
    """Frequency cap, per-item dedupe window and optional quiet hours (UTC)."""

    max_per_window: int = 3
    cap_window_s: float = 86_400.0
    dedupe_window_s: float = 7 * 86_400.0
    quiet_start_hour: int | None = None
    quiet_end_hour: int | None = None

    def in_quiet_hours(self, now: float) -> bool:
        start, end = self.quiet_start_hour, self.quiet_end_hour
        if start is None or end is None or start == end:
            return False
        hour = time.gmtime(now).tm_hour
        return start <= hour < end if start < end else hour >= start or hour < end

    def decide(
        self,
        items: Sequence[str],
        now: float,
        recent_pushes: Sequence[float],
        last_pushed: Mapping[str, float],
    ) -> Decision:
        """``recent_pushes``: times of this user's pushes; ``last_pushed``: item -> last push time."""
        if self.in_quiet_hours(now):
            return Decision(QUIET_HOURS, None)
        if sum(1 for t in recent_pushes if now - t < self.cap_window_s) >= self.max_per_window:
            return Decision(CAPPED, None)
        for item in items:
            pushed = last_pushed.get(item)
            if pushed is None or now - pushed >= self.dedupe_window_s:
                return Decision(SENT, item)
        return Decision(DEDUPED, None)
