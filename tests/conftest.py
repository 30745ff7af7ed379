"""Shared fixtures: real servers (embedded, or external when their addresses are set), hermetic names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from infra.kafka import KafkaAccess
from infra.settings import Settings, load_settings
from infra.stack import EmbeddedStack, StackError

# Deadlines are timing asserts; on shared, noisy machines they only make tests flaky.
hypothesis_settings.register_profile("pushrec", deadline=None)
hypothesis_settings.load_profile("pushrec")

ROOT = Path(__file__).resolve().parent.parent


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (a CI timeout, ``kill``) tears down as Ctrl-C does: the tests'
    workers are stopped and the embedded servers shut down, instead of being left running."""
    signal.signal(signal.SIGTERM, _interrupted)


DATASETS = Path(os.environ.get("PUSHREC_TEST_DATASETS", ROOT.parent / "shared" / "datasets"))


PUSH_AT_ONCE = {
    "PUSHREC_PUSH__AWAY_AFTER_S": "0",
    "PUSHREC_PUSH__MIN_SCORE": "-inf",
    "PUSHREC_PUSH__MIN_SCORE_QUANTILE": "0",  # no recent bar either; its own tests set one
    "PUSHREC_PUSH__SEND_TIME": "false",
    "PUSHREC_PUSH__TRIGGER_CART": "false",
    "PUSHREC_PUSH__VISITS_PER_PUSH": "1e-9",  # no activity budget: the fixed cap alone
    "PUSHREC_PUSH__HOLDOUT_SHARE": "0",  # everyone treated; the holdout's tests draw their own
}


@dataclass(frozen=True)
class Servers:
    kafka_bootstrap: str
    redis_url: str
    embedded: bool


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """External Kafka/Redis when PUSHREC_KAFKA_BOOTSTRAP and PUSHREC_REDIS_URL are set, else embedded."""
    bootstrap, redis_url = os.environ.get("PUSHREC_KAFKA_BOOTSTRAP"), os.environ.get("PUSHREC_REDIS_URL")
    if bootstrap and redis_url:
        yield Servers(bootstrap, redis_url, embedded=False)
        return
    stack = EmbeddedStack(tmp_path_factory.mktemp("stack"))
    try:
        state = stack.up()
    except StackError as exc:
        pytest.fail(f"the embedded stack could not start: {exc}")
    try:
        yield Servers(state.kafka_bootstrap, state.redis_url, embedded=True)
    finally:
        stack.down()


@dataclass(frozen=True)
class Hermetic:
    """Fresh topic prefix, consumer groups and Redis key prefix for one test."""

    servers: Servers
    prefix: str
    tmp: Path

    @property
    def kafka(self) -> KafkaAccess:
        return KafkaAccess(self.servers.kafka_bootstrap)

    def fresh(self) -> Hermetic:
        """Another set of names (topics, groups, keys, state dir) for a second run in one test."""
        name = f"t{uuid.uuid4().hex[:10]}"
        (self.tmp / name).mkdir()
        return Hermetic(self.servers, name, self.tmp / name)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a `pushrec` child process bound to this test's names."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHREC_")}
        env.update(
            PUSHREC_KAFKA_BOOTSTRAP=self.servers.kafka_bootstrap,
            PUSHREC_REDIS_URL=self.servers.redis_url,
            PUSHREC_STATE_DIR=str(self.tmp / "state"),
            PUSHREC_KAFKA__TOPIC_PREFIX=self.prefix,
            PUSHREC_KAFKA__CONSUMER_GROUP=f"{self.prefix}-worker",
            PUSHREC_REDIS__KEY_PREFIX=f"{self.prefix}:",
            PUSHREC_PUSH__CONSUMER_GROUP=f"{self.prefix}-sender",
            # Pushes decided as soon as a list is written, and sent at once: the tests of delivery
            # and of the pipeline do not wait half an hour. Tests of the policy set their own.
            **PUSH_AT_ONCE,
            # The stream's clock moves with events only: a worker left idle while a slow machine
            # reads Redis must not rank its shoppers as away meanwhile (lists compared with the
            # in-process pipeline's). The test of a quiet spell sets its own.
            PUSHREC_WORKER__IDLE_CLOCK_S="0",
        )
        env.update(extra)
        return env

    def settings(self, **extra: str) -> Settings:
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(self.env(**extra))
            return load_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def spawn(self, *args: str, log_name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "wb")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(
            [sys.executable, "-m", "pushrec.cli", *args],
            env=self.env(**extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self, log_name: str) -> str:
        return (self.tmp / log_name).read_text(errors="replace")


@pytest.fixture
def hermetic(servers: Servers, tmp_path: Path) -> Hermetic:
    return Hermetic(servers, f"t{uuid.uuid4().hex[:10]}", tmp_path)


def dataset(name: str) -> Path:
    """A shared dataset file; a missing one fails the test (never skips it)."""
    path = DATASETS / name
    if not path.exists():
        pytest.fail(f"dataset {path} not found: set PUSHREC_TEST_DATASETS to shared/datasets")
    return path


def model_process(worker_pid: int) -> int:
    """The pid of the model process a worker started (multiprocessing's spawn; its resource
    tracker is the other child)."""
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    (model,) = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return model
