"""The push sender: follow the refresh stream, apply the push policy, append to the outbox.

Reads the Redis stream through a consumer group, so an entry read but not acknowledged before a
crash is still pending and is read again on restart; the (user, list version) pair is the
idempotency key, so such a re-read never pushes twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

import orjson
from redis.exceptions import ResponseError

from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, StoredList, connect
from online_models.push_policy import SENT, PushPolicy

log = logging.getLogger("pushrec.push_sender")
FAILED = "failed"
# What became of a refresh-stream entry (label of pushrec_push_entries_total).
DECIDED, SUPERSEDED, ALREADY_SENT = "decided", "superseded", "already_sent"


class PushSender:
    """One consumer of the refresh stream writing notifications as JSON Lines."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        outbox: Path,
        metrics: Metrics | None = None,
        until_idle_s: float | None = None,
        consumer_name: str | None = None,
    ) -> None:
        push = settings.push
        self.keys = Keys(settings.redis.key_prefix)
        self.client = connect(redis_url, settings.redis.retries)
        self.store = RedisTopNStore(self.client, self.keys, settings.redis.stream_maxlen)
        self.policy = PushPolicy(
            push.max_per_window,
            push.cap_window_s,
            push.dedupe_window_s,
            push.quiet_start_hour,
            push.quiet_end_hour,
        )
        self.group = push.consumer_group
        # A stable name, so a restarted sender finds the entries it read but never acked.
        self.consumer = consumer_name or socket.gethostname()
        self.outbox = Path(outbox)
        self.metrics = metrics or Metrics()
        self.until_idle_s = until_idle_s

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.keys.refreshed(), self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        await self._ensure_group()
        log.info("push sender: group=%s consumer=%s outbox=%s", self.group, self.consumer, self.outbox)
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        last_activity = time.monotonic()
        # First our own pending entries (read before a crash, never acked), then new ones.
        cursor = "0"
        with open(self.outbox, "ab") as out:
            while True:
                reply = await self.client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.keys.refreshed(): cursor},
                    count=100,
                    block=500,
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    if cursor == "0":
                        cursor = ">"
                        continue
                    if (
                        self.until_idle_s is not None
                        and time.monotonic() - last_activity >= self.until_idle_s
                    ):
                        log.info("idle for %.1fs: stopping (--until-idle)", self.until_idle_s)
                        return
                    continue
                last_activity = time.monotonic()
                for entry_id, fields in entries:
                    await self.handle(fields[b"user_id"].decode(), int(fields[b"version"]), out)
                    await self.client.xack(self.keys.refreshed(), self.group, entry_id)

    async def handle(self, user: str, version: int, out) -> str:  # type: ignore[no-untyped-def]
        """Decide and deliver one refresh-stream entry; returns what happened to it."""
        stored = await self.store.read(user)
        if stored is None or stored.version < version:
            self.metrics.pushes.labels(FAILED).inc()
            log.warning("no list stored for user=%s version=%s", user, version)
            return FAILED
        if stored.version > version:
            # A newer list was written, and its own entry is further down the stream.
            self.metrics.push_entries.labels(SUPERSEDED).inc()
            return SUPERSEDED
        pushes_key = self.keys.pushes(user)
        if await self.client.zscore(pushes_key, str(version)) is not None:
            # Read again after a crash between delivery and ack: it was delivered, do nothing.
            self.metrics.push_entries.labels(ALREADY_SENT).inc()
            return ALREADY_SENT
        self.metrics.push_entries.labels(DECIDED).inc()
        now = time.time()
        items_key = self.keys.pushed_items(user)
        cap_from, dedupe_from = now - self.policy.cap_window_s, now - self.policy.dedupe_window_s
        recent = await self.client.zrangebyscore(pushes_key, cap_from, "+inf", withscores=True)
        pushed = await self.client.zrangebyscore(items_key, dedupe_from, "+inf", withscores=True)
        decision = self.policy.decide(
            [i["item_id"] for i in stored.items],
            now,
            [t for _, t in recent],
            {item.decode(): t for item, t in pushed},
        )
        outcome = decision.outcome
        if outcome == SENT and decision.item is not None:
            outcome = self._deliver(out, stored, decision.item, now)
            if outcome == SENT:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.zadd(pushes_key, {str(version): now})
                    pipe.zadd(items_key, {decision.item: now})
                    pipe.zremrangebyscore(pushes_key, "-inf", cap_from)
                    pipe.zremrangebyscore(items_key, "-inf", dedupe_from)
                    await pipe.execute()
        self.metrics.pushes.labels(outcome).inc()
        return outcome

    def _deliver(self, out, stored: StoredList, item: str, now: float) -> str:  # type: ignore[no-untyped-def]
        score = next((i.get("score") for i in stored.items if i["item_id"] == item), None)
        notification = {
            "notification_id": f"{stored.user_id}:{stored.version}",
            "user_id": stored.user_id,
            "item_id": item,
            "score": score,
            "list_version": stored.version,
            "model": stored.model,
            "sent_at": now,
        }
        try:
            out.write(orjson.dumps(notification) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            log.error("outbox write failed for user=%s: %s", stored.user_id, exc)
            return FAILED
        return SENT


def run_push_sender(sender: PushSender, metrics_port: int | None = None) -> None:
    if metrics_port is not None:
        sender.metrics.serve(metrics_port)
    asyncio.run(sender.run())
