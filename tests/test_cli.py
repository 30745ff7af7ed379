"""The command line: --help everywhere, one-line usage errors (exit 2), missing servers named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.stack import free_port

COMMANDS = [
    [],
    ["stack"],
    ["stack", "up"],
    ["stack", "down"],
    ["stack", "status"],
    ["worker"],
    ["push-sender"],
    ["push-report"],
    ["replay"],
    ["recs"],
    ["evaluate"],
    ["bench"],
    ["dlq"],
    ["forget"],
    ["demo"],
]


def test_the_help_check_covers_every_command() -> None:
    import argparse

    from pushrec.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {c[0] for c in COMMANDS if c}


def pushrec(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PUSHREC_")}
    return subprocess.run(
        [sys.executable, "-m", "pushrec.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pushrec")
def test_every_command_has_help(command: list[str]) -> None:
    result = pushrec(*command, "--help")
    assert result.returncode == 0
    assert "usage: pushrec" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bogus"], "invalid choice"),
        (["replay", "/no/such/file.jsonl"], "no such file"),
        (["replay", __file__, "--rate", "0"], "positive"),
        (["replay", __file__, "--rate", "5", "--speedup", "2"], "not allowed with"),
        (["worker", "--metrics-port", "99999"], "1-65535"),
        (["worker", "--until-idle", "soon"], "not a number"),
        (["recs"], "required"),
        (["push-report", "--since", "yesterday"], "an age like 7d"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    result = pushrec(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def test_bad_setting_names_the_variable() -> None:
    result = pushrec("stack", "status", env={"PUSHREC_KAFKA__PARTITIONS": "zero"})
    assert result.returncode == 2
    assert "PUSHREC_KAFKA__PARTITIONS" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_stack_and_no_addresses_says_what_to_do(tmp_path: Path) -> None:
    result = pushrec("recs", "u1", env={"PUSHREC_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "pushrec stack up" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "server"),
    [
        (["worker"], "Kafka"),
        (["replay", __file__], "Kafka"),
        (["recs", "u1"], "Redis"),
        (["push-sender"], "Kafka"),
        (["push-report"], "Kafka"),
    ],
)
def test_missing_server_is_named_without_a_traceback(args: list[str], server: str, tmp_path: Path) -> None:
    env = {
        "PUSHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "PUSHREC_REDIS_URL": f"redis://:secret@127.0.0.1:{free_port()}/0",
        "PUSHREC_REDIS__RETRIES": "1",
        "PUSHREC_STATE_DIR": str(tmp_path),
    }
    result = pushrec(*args, env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert server in last and "Traceback" not in result.stderr
    assert "secret" not in result.stderr
