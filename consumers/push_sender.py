"""The push sender: follow the refresh stream, apply the push policy, deliver (to the outbox,
or the shop's push gateway: ``consumers.push_delivery``).

Reads the Redis stream through a consumer group, so an entry read but not acknowledged before a
crash is still pending: the same consumer reads it again on restart, and any other sender of the
group claims it once it has been idle ``push.claim_idle_s``. The (user, list version) pair is the
notification's push id and idempotency key: recorded in Redis after delivery, and answered for
by the delivery channel itself before that (the outbox's tail; the gateway's Idempotency-Key),
so a crash between delivery and the Redis record never pushes twice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from consumers.push_delivery import FAILED, Delivery, Outbox, Webhook
from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, StoredList, connect
from online_models.push_policy import SENT, PushPolicy

log = logging.getLogger("pushrec.push_sender")
# What became of a refresh-stream entry (label of pushrec_push_entries_total).
DECIDED, SUPERSEDED, ALREADY_SENT, TRIMMED = "decided", "superseded", "already_sent", "trimmed"

# Refresh entries the stream's cap (MAXLEN) dropped before the group read them: entries added,
# less those still in the stream, less those the group read. Counted once across the group's
# senders: the count so far is kept beside the stream, against the group's read counter.
# KEYS: the stream, the bookkeeping hash; ARGV: the group. Returns the newly lost entries.
_COUNT_TRIMMED = """
local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
end
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
local read
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then read = field(group, 'entries-read') end
end
if not read then return 0 end  -- no group yet, or Redis cannot tell (entries deleted by XDEL)
read = tonumber(read)
local lost = tonumber(field(stream, 'entries-added')) - tonumber(field(stream, 'length')) - read
local counted = 0
if tonumber(redis.call('HGET', KEYS[2], 'read') or -1) == read then
  counted = tonumber(redis.call('HGET', KEYS[2], 'counted') or 0)
end
if lost <= counted then return 0 end
redis.call('HSET', KEYS[2], 'read', read, 'counted', lost)
return lost - counted
"""
TRIM_CHECK_EVERY_S = 1.0
OUTSIDE_SEGMENT = "outside_segment"  # a campaign (--segment TAG) skips users not tagged so


class PushSender:
    """One consumer of the refresh stream delivering notifications (to ``outbox``, or to
    ``webhook``, a URL, when given)."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        outbox: Path,
        metrics: Metrics | None = None,
        until_idle_s: float | None = None,
        consumer_name: str | None = None,
        segment: str | None = None,
        webhook: str | None = None,
    ) -> None:
        """``segment``: push only to users whose interest segment is tagged with it (a campaign)."""
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
        self.metrics = metrics or Metrics()
        self.delivery: Delivery = (
            Outbox(Path(outbox))
            if webhook is None
            else Webhook(webhook, push, self.client, self.keys, self.metrics)
        )
        self.until_idle_s = until_idle_s
        self.claim_idle_ms = int(push.claim_idle_s * 1000)
        self.segment = segment
        self._count_trimmed_script = self.client.register_script(_COUNT_TRIMMED)

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.keys.refreshed(), self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        await self._ensure_group()
        log.info(
            "push sender: group=%s consumer=%s delivering to %s",
            self.group,
            self.consumer,
            self.delivery.where,
        )
        await self.delivery.open()
        try:
            await self._follow()
        finally:
            await self.delivery.close()

    async def _follow(self) -> None:
        last_activity = time.monotonic()
        # First our own pending entries (read before a crash, never acked), then new ones.
        cursor = "0"
        next_trim_check = 0.0
        while True:
            if time.monotonic() >= next_trim_check:
                await self._count_trimmed()
                next_trim_check = time.monotonic() + TRIM_CHECK_EVERY_S
            reply = await self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.keys.refreshed(): cursor},
                count=100,
                block=500,
            )
            entries = reply[0][1] if reply else []
            if not entries and cursor == "0":
                cursor = ">"
                continue
            if not entries:
                entries = await self._claim_abandoned()
            if not entries:
                if self.until_idle_s is not None and time.monotonic() - last_activity >= self.until_idle_s:
                    log.info("idle for %.1fs: stopping (--until-idle)", self.until_idle_s)
                    return
                continue
            last_activity = time.monotonic()
            for entry_id, fields in entries:
                if fields:
                    await self.handle(fields[b"user_id"].decode(), int(fields[b"version"]))
                else:  # read before a crash, then trimmed by the cap before it was decided
                    self._lost_to_trimming(1, "read but not decided")
                await self.client.xack(self.keys.refreshed(), self.group, entry_id)

    async def _claim_abandoned(self) -> list:  # type: ignore[type-arg]
        """Entries another sender of the group read and never acked (it crashed, or its host is gone)."""
        _, claimed, deleted = await self.client.xautoclaim(
            self.keys.refreshed(), self.group, self.consumer, self.claim_idle_ms, "0-0", count=100
        )
        if claimed:
            log.info("claimed %d entries abandoned by another sender", len(claimed))
        if deleted:  # XAUTOCLAIM drops them from the group's pending list
            self._lost_to_trimming(len(deleted), "read by another sender but not decided")
        return claimed  # type: ignore[no-any-return]

    async def _count_trimmed(self) -> None:
        """Count refresh entries the stream's cap dropped before any sender of the group read them."""
        stream = self.keys.refreshed()
        try:
            lost = await self._count_trimmed_script(
                keys=[stream, self.keys.refreshed_trimmed()], args=[self.group]
            )
        except ResponseError as exc:  # e.g. the stream does not exist yet
            log.debug("trimmed-entry count skipped: %s", exc)
            return
        if lost:
            self._lost_to_trimming(int(lost), "never read")

    def _lost_to_trimming(self, count: int, how: str) -> None:
        self.metrics.push_entries.labels(TRIMMED).inc(count)
        log.warning(
            "%d refresh entries (%s) were trimmed by the stream's cap (PUSHREC_REDIS__STREAM_MAXLEN=%d) "
            "before a push was decided for them: those pushes are lost; raise the cap or keep "
            "senders running",
            count,
            how,
            self.store.stream_maxlen,
        )

    async def handle(self, user: str, version: int) -> str:
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
        if self.segment is not None and self.segment not in stored.tags:
            self.metrics.push_entries.labels(OUTSIDE_SEGMENT).inc()
            return OUTSIDE_SEGMENT
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
            push_id = f"{stored.user_id}:{stored.version}"
            if self.delivery.delivered_before(push_id):
                # Delivered before a crash that came before the Redis record: record it only.
                outcome = ALREADY_SENT
            else:
                outcome = await self.delivery.deliver(
                    await self._notification(push_id, stored, decision.item, now)
                )
            if outcome in (SENT, ALREADY_SENT):
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.zadd(pushes_key, {str(version): now})
                    pipe.zadd(items_key, {decision.item: now})
                    pipe.zremrangebyscore(pushes_key, "-inf", cap_from)
                    pipe.zremrangebyscore(items_key, "-inf", dedupe_from)
                    await pipe.execute()
                self.delivery.recorded(push_id)  # Redis answers for it now
        if outcome == ALREADY_SENT:
            self.metrics.push_entries.labels(ALREADY_SENT).inc()
            return ALREADY_SENT
        self.metrics.pushes.labels(outcome).inc()
        return outcome

    async def _notification(self, push_id: str, stored: StoredList, item: str, now: float) -> dict[str, Any]:
        listed = next((i for i in stored.items if i["item_id"] == item), {})
        title = await self.client.hget(self.keys.item(item), "title")  # None without a catalogue
        return {
            "notification_id": push_id,
            "push_id": push_id,
            "user_id": stored.user_id,
            "item_id": item,
            "title": title.decode() if title is not None else None,
            "score": listed.get("score"),
            "reason": listed.get("reason"),
            "list_version": stored.version,
            "model": stored.model,
            "sent_at": now,
        }


def run_push_sender(sender: PushSender, metrics_port: int | None = None) -> None:
    if metrics_port is not None:
        sender.metrics.serve(metrics_port)
    asyncio.run(sender.run())
