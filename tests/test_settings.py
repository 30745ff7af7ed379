"""The settings object: .env.example is generated from it and loads back to the defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.settings import ConfigError, Settings, env_example, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_is_current() -> None:
    assert (ROOT / ".env.example").read_text() == env_example(), "regenerate: python -m infra.settings"


def test_env_example_loads_back_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("PUSHREC_")]:
        monkeypatch.delenv(key)
    for line in env_example().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, os.path.expanduser(value))
    assert load_settings() == Settings()


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHREC_MODEL__TYPE_WEIGHTS", '{"wishlist": 1.0}')
    with pytest.raises(ConfigError, match="PUSHREC_MODEL__TYPE_WEIGHTS"):
        load_settings()
