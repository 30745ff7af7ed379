"""Where the push sender hands a notification over: a JSON Lines outbox (the default), or the
shop's push gateway over HTTP (``pushrec push-sender --webhook URL``; FCM and APNs stay behind it).

Both deliver each notification once by its push id (``user:list version``), through crashes:

- The outbox is its own record: a notification is delivered once its line is fsync'd, and the
  sender reads the outbox's tail at start, so a crash between delivery and the Redis record does
  not deliver it again.
- The webhook sends the push id as the ``Idempotency-Key`` header: a retry after a lost answer
  (a timeout, a connection closed mid-reply, a crash before the Redis record) is the same push,
  and the gateway keeps one. Transient failures (timeouts, connection errors, 408, 429, 5xx) are
  retried with exponential backoff and full jitter, honouring ``Retry-After``; a permanent one
  (any other 4xx, a redirect) goes to the push dead-letter stream with its reason, and so does a
  push the gateway refused for ``webhook_give_up_s``. Either way the refresh entry is then done.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import orjson
import redis.asyncio as aioredis

from infra.faults import crash_point
from infra.metrics import Metrics
from infra.settings import PushSettings
from infra.store import Keys
from online_models.push_policy import SENT

log = logging.getLogger("pushrec.push_sender")
FAILED, DEAD_LETTER = "failed", "dead_letter"


class Delivery(Protocol):
    """What the push sender delivers through."""

    where: str

    async def open(self) -> None: ...
    def delivered_before(self, push_id: str) -> bool: ...
    async def deliver(self, notification: dict[str, Any]) -> str: ...
    def recorded(self, push_id: str) -> None: ...
    async def close(self) -> None: ...


class Outbox:
    """Notifications appended to a JSON Lines file, one fsync'd line each."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = str(path)
        # Notifications in the outbox whose Redis record may be missing: those a crash may have
        # left there (read from the outbox's tail at start) and the one being recorded. Bounded:
        # an id leaves once its record is in Redis, which answers for it from then on.
        self._delivered: set[str] = set()
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._delivered = _recent_notification_ids(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 (kept open while the sender runs)

    def delivered_before(self, push_id: str) -> bool:
        return push_id in self._delivered

    async def deliver(self, notification: dict[str, Any]) -> str:
        assert self._file is not None, "open() first"
        try:
            self._file.write(orjson.dumps(notification) + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            log.error("outbox write failed for user=%s: %s", notification["user_id"], exc)
            return FAILED
        self._delivered.add(notification["notification_id"])
        crash_point("push_sender.after_delivery")
        return SENT

    def recorded(self, push_id: str) -> None:
        self._delivered.discard(push_id)  # Redis answers for it now

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Webhook:
    """Each notification POSTed as JSON to ``url``, retried until the gateway takes it."""

    def __init__(
        self, url: str, settings: PushSettings, client: aioredis.Redis, keys: Keys, metrics: Metrics
    ) -> None:
        self.url = url
        self.where = url
        self.settings = settings
        self.redis, self.keys, self.metrics = client, keys, metrics
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False)

    def delivered_before(self, push_id: str) -> bool:
        return False  # the gateway answers for it: the push id is the Idempotency-Key

    def recorded(self, push_id: str) -> None:
        pass

    async def deliver(self, notification: dict[str, Any]) -> str:
        assert self._http is not None, "open() first"
        push_id = notification["notification_id"]
        body = orjson.dumps(notification)
        headers = {"Content-Type": "application/json", "Idempotency-Key": push_id}
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            wait: float | None = None
            try:
                answer = await self._http.post(self.url, content=body, headers=headers)
            except httpx.TransportError as exc:  # timed out, refused, closed, reset
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if answer.is_success:
                    crash_point("push_sender.after_delivery")
                    return SENT
                why = f"HTTP {answer.status_code}"
                if answer.status_code not in (408, 429) and answer.status_code < 500:
                    await self._dead_letter(notification, f"{why}: {answer.text[:200]}")
                    return DEAD_LETTER
                wait = _retry_after(answer.headers.get("Retry-After"))
            if wait is None:  # full jitter (AWS's backoff note): spreads the retries of many senders
                cap = min(
                    self.settings.webhook_backoff_max_s, self.settings.webhook_backoff_s * 2 ** (attempt - 1)
                )
                wait = random.uniform(0.0, cap)
            waited = time.monotonic() - started
            if waited + wait > self.settings.webhook_give_up_s:
                await self._dead_letter(
                    notification, f"gave up after {attempt} attempts in {waited:.0f}s: {why}"
                )
                return DEAD_LETTER
            self.metrics.push_retries.inc()
            log.warning(
                "push %s not taken by %s (%s): retry %d in %.1fs", push_id, self.url, why, attempt, wait
            )
            await asyncio.sleep(wait)

    async def _dead_letter(self, notification: dict[str, Any], reason: str) -> None:
        log.error("push %s dead-lettered: %s", notification["notification_id"], reason)
        fields = {"notification": orjson.dumps(notification), "reason": reason, "at": repr(time.time())}
        await self.redis.xadd(self.keys.push_dead_letters(), fields, maxlen=100_000, approximate=True)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _drop_torn_tail(outbox: Path) -> None:
    """Cut a last line left half-written by a crash (it was never delivered whole)."""
    if not outbox.exists() or outbox.stat().st_size == 0:
        return
    with open(outbox, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else max(0, size - len(tail))
        log.warning("outbox ended in a torn line: dropped its last %d bytes", size - cut)
        f.truncate(cut)


def _recent_notification_ids(outbox: Path, tail_bytes: int = 4 << 20) -> set[str]:
    """Notification ids in the last ``tail_bytes`` of the outbox: what a crash may have left
    delivered but unrecorded is always at its end."""
    if not outbox.exists():
        return set()
    with open(outbox, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        lines = f.read().splitlines()
    if size > tail_bytes:
        lines = lines[1:]  # the first may be cut
    ids, unreadable = set(), 0
    for line in lines:
        try:
            ids.add(orjson.loads(line)["notification_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            unreadable += 1
    if unreadable:
        log.warning("outbox %s: %d line(s) that are not notifications were skipped", outbox, unreadable)
    return ids
