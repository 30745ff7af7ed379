"""Fault injection for the crash tests: die at a named point, the way kill -9 would.

``PUSHREC_FAULTS="push_sender.after_delivery=3"`` makes the process SIGKILL itself the 3rd time it
passes that point (:func:`crash_point`), or raise :class:`InjectedFault` there (:func:`fail_point`:
a bug's exception, not a kill). Unset in production, where :func:`crash_point` costs one dict lookup. Kept out
of :class:`infra.settings.Settings` on purpose: it is a test hook, not configuration.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_PLAN = dict(
    (name.strip(), int(count))
    for name, _, count in (part.partition("=") for part in os.environ.get("PUSHREC_FAULTS", "").split(","))
    if name.strip()
)
_passed: Counter[str] = Counter()


def crash_point(name: str) -> None:
    if name in _PLAN:
        _passed[name] += 1
        if _passed[name] == _PLAN[name]:
            os.kill(os.getpid(), signal.SIGKILL)


class InjectedFault(RuntimeError):
    """The exception :func:`fail_point` raises: stands for a bug."""


def fail_point(name: str) -> None:
    if name in _PLAN:
        _passed[name] += 1
        if _passed[name] == _PLAN[name]:
            raise InjectedFault(f"fault injected at {name} (PUSHREC_FAULTS)")
