"""Redis AUTH against a real Valkey started with a password; secrets stay out of output and reprs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra.kafka import KafkaAccess
from infra.stack import free_port, valkey_binary
from infra.store import Keys, RedisTopNStore, connect
from online_models.recommender import TopN
from tests.conftest import Hermetic

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-pw-7781"


@pytest.fixture
def valkey_with_password(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    server = subprocess.Popen(
        [
            valkey_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password=PASSWORD).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def recs(hermetic: Hermetic, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushrec.cli", "recs", "alice", "--json"],
        env=hermetic.env(PUSHREC_REDIS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_redis_auth_works_and_refusals_are_one_clear_line(
    hermetic: Hermetic, valkey_with_password: int
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{valkey_with_password}/0"

    async def store() -> None:
        client = connect(url)
        try:
            await RedisTopNStore(client, Keys(f"{hermetic.prefix}:")).write_lists(
                [TopN("alice", ["a"], [1.0], "pushrec")], 1.0
            )
        finally:
            await client.aclose()

    asyncio.run(store())
    ok = recs(hermetic, url)
    assert ok.returncode == 0, ok.stderr
    assert '"item_id": "a"' in ok.stdout

    wrong = recs(hermetic, f"redis://:nope@127.0.0.1:{valkey_with_password}/0")
    missing = recs(hermetic, f"redis://127.0.0.1:{valkey_with_password}/0")
    assert wrong.returncode == 1 and "rejected the credentials" in wrong.stderr
    assert missing.returncode == 1 and "requires a password" in missing.stderr
    for result in (ok, wrong, missing):
        assert len(result.stderr.strip().splitlines()) <= 1, result.stderr
        assert PASSWORD not in result.stderr + result.stdout
    assert "nope" not in wrong.stderr  # even a wrong password is redacted


def test_kafka_secrets_never_in_repr_or_settings_dump(hermetic: Hermetic) -> None:
    settings = hermetic.settings(
        PUSHREC_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        PUSHREC_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
        PUSHREC_KAFKA__SASL_USERNAME="svc",
        PUSHREC_KAFKA__SASL_PASSWORD=PASSWORD,
    )
    access = KafkaAccess.from_settings(settings, "k1:9093")
    assert access.client_options()["sasl_plain_password"] == PASSWORD  # passed through to the client
    assert access.faust_credentials().mechanism.value == "SCRAM-SHA-512"
    for text in (repr(access), str(access), repr(settings), str(settings.model_dump())):
        assert PASSWORD not in text
