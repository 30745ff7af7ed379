"""The README's quick start: `pushrec demo` runs everything embedded and leaves nothing behind."""

from __future__ import annotations

import subprocess

import pytest

from tests.test_cli import pushrec

pytestmark = pytest.mark.integration


def children_named(name: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True, check=False).stdout
    return out.split()


def test_demo_prints_lists_pushes_and_metrics_and_cleans_up() -> None:
    brokers_before = set(children_named("tansu"))
    result = pushrec("demo", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "model pushrec" in out and "push notifications in the outbox" in out
    assert "pushrec_events_total{outcome=processed} = 3000" in out
    assert "pushrec_events_total{outcome=dead_letter} = 4" in out
    assert set(children_named("tansu")) <= brokers_before
