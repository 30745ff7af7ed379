"""`push-sender --webhook`: real HTTP to a real local server that misbehaves, against real Valkey.

The server plays a push gateway: it keeps one notification per Idempotency-Key (as FCM's and
most gateways' idempotency keys do) and, per user, times out, answers 500, 429 with Retry-After,
closes the connection, refuses for good (400) or goes down for a while."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
import redis

from consumers.push_sender import PushSender
from online_models.recommender import TopN
from tests.conftest import Hermetic
from tests.test_push_sender import write

pytestmark = pytest.mark.integration

FAST = {  # seconds, so that the test takes a few
    "PUSHREC_PUSH__WEBHOOK_TIMEOUT_S": "0.5",
    "PUSHREC_PUSH__WEBHOOK_BACKOFF_S": "0.05",
    "PUSHREC_PUSH__WEBHOOK_BACKOFF_MAX_S": "0.3",
    "PUSHREC_PUSH__WEBHOOK_GIVE_UP_S": "30",
    "PUSHREC_PUSH__MAX_PER_WINDOW": "10",
}


class Gateway:
    """A push gateway on a free local port. ``script[user]``: what the first requests for that
    user get, in order ("timeout": answered 200 after the client gave up, "500", "429", "close",
    "400"); after the script, 200. ``down_after``: requests after which it stops listening for
    ``down_s``."""

    def __init__(
        self, script: dict[str, list[str]], down_after: int | None = None, down_s: float = 1.5
    ) -> None:
        self.script = {user: list(steps) for user, steps in script.items()}
        self.accepted: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> notification, kept once
        self.requests: list[tuple[str | None, dict[str, Any]]] = []
        self.down_after, self.down_s = down_after, down_s
        self.lock = threading.Lock()
        self.outages = 0
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/push"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Idempotency-Key")
                with gateway.lock:
                    gateway.requests.append((key, body))
                    steps = gateway.script.get(body["user_id"], [])
                    step = steps.pop(0) if steps else "200"
                    down = gateway.down_after is not None and len(gateway.requests) == gateway.down_after
                if down:  # stops listening before it answers: what follows is refused
                    gateway.server.shutdown()
                    gateway.server.server_close()
                    threading.Thread(target=gateway._back_later, daemon=True).start()
                if step == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if step in ("200", "timeout"):
                    with gateway.lock:
                        gateway.accepted.setdefault(key or "", body)  # taken, once per key
                    if step == "timeout":
                        time.sleep(1.0)  # the client gave up at 0.5 s
                    self._answer(200)
                elif step == "429":
                    self._answer(429, {"Retry-After": "1"})
                else:
                    self._answer(int(step))

            def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client left (it timed out)
                    pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def _back_later(self) -> None:
        self.outages += 1
        time.sleep(self.down_s)
        self.server = self._serve(self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_every_push_reaches_a_misbehaving_gateway_once_and_refusals_are_dead_lettered(
    hermetic: Hermetic,
) -> None:
    script = {"u1": ["timeout"], "u2": ["500", "500"], "u3": ["429"], "u4": ["close"], "u5": ["400"]}
    gateway = Gateway(script, down_after=9)
    users = [f"u{k}" for k in range(10)]
    try:
        asyncio.run(
            write(
                hermetic, *[TopN(user, [f"{user}-item"], [0.9], "pushrec", reasons=["r"]) for user in users]
            )
        )
        redis.Redis.from_url(hermetic.servers.redis_url).hset(
            f"{hermetic.prefix}:item:u0-item", "title", "Red hat"
        )
        started = time.monotonic()
        sender = PushSender(
            hermetic.settings(**FAST),
            hermetic.kafka,
            hermetic.servers.redis_url,
            hermetic.tmp / "unused.jsonl",
            until_idle_s=0.5,
            webhook=gateway.url,
        )
        asyncio.run(sender.run())
    finally:
        gateway.close()
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    push_id = {
        user: f"{user}:{int(client.hget(f'{hermetic.prefix}:recs:{user}', 'version'))}:away" for user in users
    }
    taken = set(gateway.accepted)
    want = {push_id[user] for user in users if user != "u5"}
    assert taken == want  # every push the gateway takes, once by its key; none missing
    assert all(key is not None for key, _ in gateway.requests)
    by_key: dict[str, set[bytes]] = {}
    for key, body in gateway.requests:  # a retry is the same notification
        by_key.setdefault(str(key), set()).add(orjson.dumps({k: v for k, v in body.items()}))
        assert key == body["push_id"] == body["notification_id"]
    assert all(len(bodies) == 1 for bodies in by_key.values())
    first = gateway.accepted[push_id["u0"]]
    fields = ("push_id", "user_id", "item_id", "title", "reason")
    assert [first[name] for name in fields] == [push_id["u0"], "u0", "u0-item", "Red hat", "r"]
    assert push_id["u0"] == f"u0:{first['list_version']}:away"
    # The refusal: in the push dead letters with its reason, not retried.
    assert sum(1 for key, _ in gateway.requests if key == push_id["u5"]) == 1
    letters = client.xrange(f"{hermetic.prefix}:push:dead-letters")
    assert [(orjson.loads(f[b"notification"])["push_id"], f[b"reason"].decode()[:8]) for _, f in letters] == [
        (push_id["u5"], "HTTP 400")
    ]
    assert sender.metrics.pushes.labels("sent")._value.get() == 9
    assert sender.metrics.pushes.labels("dead_letter")._value.get() == 1
    # timeout, 500 x2, 429, close, and the outage (at least one refused connection) were retried
    assert sender.metrics.push_retries._value.get() >= 6
    assert time.monotonic() - started >= 1.5  # Retry-After: 1 was honoured, the outage waited out
    assert gateway.outages == 1


def test_kill_9_after_a_webhook_delivery_is_the_same_push_again(hermetic: Hermetic) -> None:
    """The sender dies right after the gateway took its 2nd push, before Redis knew; restarted,
    it posts that push again under the same key: the gateway still holds one of each."""
    gateway = Gateway({})
    lists = [TopN(f"v{k}", [f"i{k}"], [0.9], "pushrec") for k in range(4)]
    asyncio.run(write(hermetic, *lists))

    def deliver(**env: str) -> subprocess.CompletedProcess[bytes]:
        command = [
            sys.executable,
            "-m",
            "pushrec.cli",
            "push-sender",
            "--webhook",
            gateway.url,
            "--until-idle",
            "1",
        ]
        return subprocess.run(
            command, env=hermetic.env(**FAST, **env), capture_output=True, timeout=60, check=False
        )

    try:
        crashed = deliver(PUSHREC_FAULTS="push_sender.after_delivery=2")
        assert crashed.returncode == -9, crashed.stderr
        assert len(gateway.accepted) == 2
        restarted = deliver()
        assert restarted.returncode == 0, restarted.stderr
    finally:
        gateway.close()
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    push_id = [f"v{k}:{int(client.hget(f'{hermetic.prefix}:recs:v{k}', 'version'))}:away" for k in range(4)]
    assert set(gateway.accepted) == set(push_id)
    second = [key for key, _ in gateway.requests][1]
    assert sum(1 for key, _ in gateway.requests if key == second) == 2  # posted again, kept once
    assert len(gateway.requests) == 5


def test_a_webhook_that_is_not_a_url_is_refused_in_one_line(hermetic: Hermetic) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pushrec.cli", "push-sender", "--webhook", "gateway.local/push"],
        env=hermetic.env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "not an http:// or https:// URL" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
