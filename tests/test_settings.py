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


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PUSHREC_MODEL__TYPE_WEIGHTS", '{"purchase": 1e300}'),
        ("PUSHREC_MODEL__TYPE_WEIGHTS", '{"view": -1}'),
        ("PUSHREC_EVENTS__MAX_RATING", "10"),
        ("PUSHREC_EVENTS__MIN_RATING", "6"),
    ],
)
def test_bounds_on_what_the_model_reads_are_checked_at_load(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable.rsplit("__", 1)[0]):
        load_settings()


def test_event_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHREC_EVENTS__MIN_RATING", "1")
    limits = load_settings().events.limits
    assert (limits.min_rating, limits.max_rating, limits.max_id_length) == (1.0, 5.0, 256)
