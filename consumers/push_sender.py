"""The push sender: follow the refresh stream, decide under the push policy when a shopper has
left, hold the push until its send time, deliver (to the outbox, or the shop's push gateway:
``consumers.push_delivery``).

Three steps, each crash-safe in Redis and shared by every sender of the group:

1. **Observe.** The refresh stream, read through a consumer group (an entry read and not acked
   before a crash is read again), says a shopper was active: their consideration in the sorted
   set ``push:due`` moves to ``away_after_s`` (and the cart's to ``cart_after_s``) from now, and
   their activity (last seen, visits, the hours visits begin) is counted.
2. **Decide.** A due shopper is claimed (moved to a claims set, atomically), decided for from
   their stored list (``online_models.push_policy``), and the push, if any, put in ``push:held``
   scored by its send time, in one transaction with dropping the claim.
3. **Deliver.** A held push whose time has come is claimed the same way; it is dropped if the
   shopper came back since it was decided, else delivered and recorded in one transaction with
   dropping the claim.

Every decision, sent or not, is written to the exposure log (``stream.exposures``) before it is
recorded as done in Redis. A stable share of shoppers (``push.holdout_share``, by a hash of their
id: ``online_models.push_policy.in_holdout``) is the control group: their pushes are decided and
held like everyone's, and at the send time logged as ``holdout`` instead of delivered.

A claim older than ``push.claim_idle_s`` (its sender died) goes back to its queue. The push id
(user, list version, queue: away or cart) is the idempotency key, and one list gets at most one
push per queue: the delivery channel answers for a push
delivered before a crash that came before its record (the outbox's tail; the gateway's
Idempotency-Key), so nothing is pushed twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import ResponseError

from consumers.push_attribution import PushAttribution
from consumers.push_delivery import Delivery, Outbox, Webhook
from infra.kafka import KafkaAccess
from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, StoredList, connect
from online_models.push_policy import (
    ACTIVE,
    AWAY,
    BROWSE,
    CART,
    DEDUPED,
    HOLDOUT,
    PRICE_DROP,
    QUIET_HOURS,
    REPLENISHMENT,
    SENT,
    Activity,
    Candidate,
    Decision,
    PushPolicy,
    RecentScores,
    hour_of_week,
    in_holdout,
)
from stream.exposures import ExposureLog
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger("pushrec.push_sender")
# What became of a refresh-stream entry (label of pushrec_push_entries_total); already_sent: a
# held push found delivered before a crash (counted once, not as a new push).
OBSERVED, ALREADY_SENT, TRIMMED = "observed", "already_sent", "trimmed"
AWAY_QUEUE, CART_QUEUE = "away", "cart"  # push:due members: "<queue>:<user>"
PRICE_QUEUE = "price"  # push:due members "price:" + JSON (user, item, old and new price)
WATCH_S = 30 * 86_400  # a shopper watches the price of an item they engaged with this long
TREATED = "treated"  # the exposure record's group of a shopper outside the holdout
POLL_MS = 200  # longest wait on the refresh stream between looks at the due and held pushes
CLAIM_BATCH = 100
RECLAIM_EVERY_S = 5.0
# The worker re-ranks a shopper once they have left, on its stream's clock (a list flagged away):
# the away decision waits up to this long past its due time for that list, looking again this often.
AWAY_LIST_WAIT_S, AWAY_LIST_POLL_S = 10.0, 1.0
ACTIVITY_TTL_S = 35 * 86_400  # a shopper's activity is forgotten after five quiet weeks

# Members of KEYS[1] (a sorted set) scored ARGV[1] or less, at most ARGV[2], moved to KEYS[2] as
# ARGV[3] .. member (the claimer's name and a NUL first), scored ARGV[1] (the claim's time).
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3] .. member)
end
return due
"""
# Claims (KEYS[2]) made at ARGV[1] or before, or by the claimer ARGV[3] (restarted: its claims
# were cut short), go back to KEYS[1], due at ARGV[2] unless already there (a shopper active
# again meanwhile keeps their later time). Returns how many.
_RECLAIM = """
local back = 0
local claims = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #claims, 2 do
  local claim, at = claims[i], tonumber(claims[i + 1])
  local cut = string.find(claim, '\\0', 1, true)
  if at <= tonumber(ARGV[1]) or string.sub(claim, 1, cut) == ARGV[3] then
    redis.call('ZREM', KEYS[2], claim)
    redis.call('ZADD', KEYS[1], 'NX', ARGV[2], string.sub(claim, cut + 1))
    back = back + 1
  end
end
return back
"""

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


def build_push_policy(settings: Settings) -> PushPolicy:
    """The push policy as configured (the sender's and `pushrec evaluate --push`'s)."""
    push = settings.push
    switched_on = {
        AWAY: push.trigger_away,
        BROWSE: push.trigger_browse,
        CART: push.trigger_cart,
        REPLENISHMENT: push.trigger_replenishment,
        PRICE_DROP: push.trigger_price_drop,
    }
    return PushPolicy(
        max_per_window=push.max_per_window,
        cap_window_s=push.cap_window_s,
        dedupe_window_s=push.dedupe_window_s,
        quiet_start_hour=push.quiet_start_hour,
        quiet_end_hour=push.quiet_end_hour,
        min_score=push.min_score,
        min_score_quantile=push.min_score_quantile,
        score_window=push.score_window,
        visits_per_push=push.visits_per_push,
        away_after_s=push.away_after_s,
        cart_after_s=push.cart_after_s,
        triggers=frozenset(t for t, on in switched_on.items() if on),
        learn_send_time=push.send_time,
        price_drop_min_share=push.price_drop_min_share,
    )


class PushSender:
    """One sender of the group: follows the refresh stream, decides when shoppers have left, and
    delivers the pushes whose send time has come (to ``outbox``, or to ``webhook``, a URL)."""

    def __init__(
        self,
        settings: Settings,
        kafka: KafkaAccess,
        redis_url: str,
        outbox: Path,
        metrics: Metrics | None = None,
        until_idle_s: float | None = None,
        consumer_name: str | None = None,
        segment: str | None = None,
        webhook: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``segment``: push only to users whose interest segment is tagged with it (a campaign);
        ``clock``: the wall clock (tests move it); ``kafka``: where the exposure log is written."""
        push = settings.push
        self.kafka, self.kafka_settings = kafka, settings.kafka
        self.exposure_topic = TopicNames(settings.kafka.topic_prefix).pushes
        self.exposures: ExposureLog | None = None  # opened by run()
        self.holdout_share, self.holdout_salt = push.holdout_share, push.holdout_salt
        self.keys = Keys(settings.redis.key_prefix)
        self.client = connect(redis_url, settings.redis.retries)
        self.store = RedisTopNStore(self.client, self.keys, settings.redis.stream_maxlen)
        self.policy = build_push_policy(settings)
        self.group = push.consumer_group
        # A stable name, so a restarted sender finds the entries it read but never acked.
        self.consumer = consumer_name or socket.gethostname()
        self.metrics = metrics or Metrics()
        self.delivery: Delivery = (
            Outbox(Path(outbox))
            if webhook is None
            else Webhook(webhook, push, self.client, self.keys, self.metrics)
        )
        self.attribution = PushAttribution(settings, kafka, self.client, self.keys, self.metrics)
        self.until_idle_s = until_idle_s
        self.claim_idle_s = push.claim_idle_s
        # (A worker's visit gap longer than the push's: its away list comes too late to wait for.)
        self.away_list_wait_s = AWAY_LIST_WAIT_S if push.away_after_s >= settings.model.visit_gap_s else 0.0
        self.segment = segment
        self.clock = clock
        self._count_trimmed_script = self.client.register_script(_COUNT_TRIMMED)
        self._claim_script = self.client.register_script(_CLAIM)
        self._reclaim_script = self.client.register_script(_RECLAIM)
        self._claimer = self.consumer.encode() + b"\0"  # prefix of this sender's claims
        self._drops_cursor = "0"
        self._claim_drops_at = 0.0  # when to look for price drops a crashed sender left
        self._common_hours: dict[int, float] = {}
        self._common_read_at = -math.inf
        self._recent = RecentScores(self.policy.score_window)  # the group's, read once a minute
        self._recent_read_at = -math.inf

    async def _ensure_group(self) -> None:
        for stream in (self.keys.refreshed(), self.keys.price_drops()):
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self) -> None:
        await self._ensure_group()
        topic, kafka = self.exposure_topic, self.kafka_settings
        read_and_written = [topic, *self.attribution.topics]
        await asyncio.to_thread(
            ensure_topics, self.kafka, read_and_written, kafka.partitions, kafka.replication_factor
        )
        self.exposures = ExposureLog(self.kafka, topic)
        await self.attribution.open()
        log.info(
            "push sender: group=%s consumer=%s delivering to %s; a push is considered %.0f s after "
            "a shopper's last event",
            self.group,
            self.consumer,
            self.delivery.where,
            self.policy.away_after_s,
        )
        await self.delivery.open()
        try:
            await self._follow()
        finally:
            await self.delivery.close()
            await self.attribution.close()
            self.exposures.close()

    async def _follow(self) -> None:
        last_activity = time.monotonic()
        # First our own pending entries (read before a crash, never acked), then new ones.
        cursor = "0"
        next_trim_check = next_reclaim = 0.0
        await self._reclaim(own=True)  # what this sender held when it stopped
        while True:
            if time.monotonic() >= next_trim_check:
                await self._count_trimmed()
                next_trim_check = time.monotonic() + TRIM_CHECK_EVERY_S
            if time.monotonic() >= next_reclaim:
                await self._reclaim()
                next_reclaim = time.monotonic() + min(self.claim_idle_s / 2, RECLAIM_EVERY_S)
            reply = await self.client.xreadgroup(
                self.group, self.consumer, {self.keys.refreshed(): cursor}, count=100, block=POLL_MS
            )
            entries = reply[0][1] if reply else []
            if not entries and cursor == "0":
                cursor = ">"
            elif not entries:
                entries = await self._claim_abandoned(self.keys.refreshed())
            busy = bool(entries)
            if entries:
                await self._observe(entries)
            busy |= await self._price_drops()
            busy |= await self._decide_due()
            busy |= await self._deliver_held()
            busy |= await self.attribution.follow()
            if busy:
                last_activity = time.monotonic()
            elif self.until_idle_s is not None and time.monotonic() - last_activity >= self.until_idle_s:
                log.info("idle for %.1fs: stopping (--until-idle)", self.until_idle_s)
                return

    async def _observe(self, entries: list) -> None:  # type: ignore[type-arg]
        """Refresh entries are shoppers' activity: each moves their push consideration later, and
        a first one after ``away_after_s`` counts a visit (the budget, the send hour). An entry
        flagged away (the list re-ranked because the shopper left) is not."""
        now = self.clock()
        names = list(
            dict.fromkeys(
                fields[b"user_id"].decode() for _, fields in entries if fields and fields.get(b"away") != b"1"
            )
        )
        empty = sum(1 for _, fields in entries if not fields)
        if empty:  # read before a crash, then trimmed by the cap before it was decided
            self._lost_to_trimming(empty, "read but not decided")
        async with self.client.pipeline(transaction=False) as pipe:
            for user in names:
                pipe.hgetall(self.keys.push_activity(user))
            stored = await pipe.execute()
        policy = self.policy
        async with self.client.pipeline(transaction=True) as pipe:
            for user, fields in zip(names, stored, strict=True):
                activity = _activity(fields)
                key = self.keys.push_activity(user)
                if activity.seen(now, policy.away_after_s):
                    hour = _HOUR.format(hour_of_week(now))
                    pipe.hincrbyfloat(key, hour, 1.0)
                    pipe.hincrbyfloat(self.keys.push_hours(), hour, 1.0)
                pipe.hset(key, mapping={"last": activity.last, "visits": activity.visits})
                pipe.expire(key, ACTIVITY_TTL_S)
                due = {f"{AWAY_QUEUE}:{user}": now + policy.away_after_s}
                if CART in policy.triggers:
                    due[f"{CART_QUEUE}:{user}"] = now + policy.cart_after_s
                pipe.zadd(self.keys.push_due(), due)
            pipe.xack(self.keys.refreshed(), self.group, *[entry_id for entry_id, _ in entries])
            await pipe.execute()
        self.metrics.push_entries.labels(OBSERVED).inc(len(entries) - empty)

    async def _claim(self, queue: str, claims: str, now: float) -> list[bytes]:
        """Members of the sorted set ``queue`` due by ``now``, moved to ``claims`` (at ``now``)."""
        return await self._claim_script(keys=[queue, claims], args=[now, CLAIM_BATCH, self._claimer])  # type: ignore[no-any-return]

    async def _reclaim(self, own: bool = False) -> None:
        """Claims older than ``claim_idle_s`` (their sender died), and with ``own`` this sender's
        (it restarted), go back to their queue, due now."""
        now = self.clock()
        mine = self._claimer if own else b"\0"  # no claimer's name is empty
        for what, queue, claims in (
            ("decisions", self.keys.push_due(), self.keys.push_due_claims()),
            ("deliveries", self.keys.push_held(), self.keys.push_held_claims()),
        ):
            back = await self._reclaim_script(keys=[queue, claims], args=[now - self.claim_idle_s, now, mine])
            if back:
                log.info("reclaimed %d push %s abandoned by a sender", back, what)

    async def _decide_due(self) -> bool:
        """Decide for every shopper whose consideration is due; whether there was any."""
        now = self.clock()
        due = await self._claim(self.keys.push_due(), self.keys.push_due_claims(), now)
        self.metrics.push_due.set(await self.client.zcard(self.keys.push_due()))
        for member in due:
            queue, _, rest = member.decode().partition(":")
            if queue == PRICE_QUEUE:
                await self._decide_price_drop(member, orjson.loads(rest), now)
            else:
                await self._decide(member, rest, queue, now)
        return bool(due)

    async def _price_drops(self) -> bool:
        """Catalogue prices that fell: every shopper watching the item is considered for a
        ``price_drop`` push, now, or once they leave if they are active. Whether there were any."""
        reply = await self.client.xreadgroup(
            self.group, self.consumer, {self.keys.price_drops(): self._drops_cursor}, count=100
        )
        entries = reply[0][1] if reply else []
        if not entries and self._drops_cursor == "0":
            self._drops_cursor = ">"  # after our own pending ones (read before a crash), new ones
        elif not entries and time.monotonic() >= self._claim_drops_at:
            entries = await self._claim_abandoned(self.keys.price_drops())
            self._claim_drops_at = time.monotonic() + min(self.claim_idle_s / 2, RECLAIM_EVERY_S)
        if not entries:
            return False
        now, policy = self.clock(), self.policy
        drops = [  # fields are empty for an entry read before a crash, then trimmed by the cap
            (entry_id.decode(), fields[b"item_id"].decode(), float(fields[b"old"]), float(fields[b"new"]))
            for entry_id, fields in entries
            if fields and policy.price_dropped(float(fields[b"old"]), float(fields[b"new"]))
        ]
        async with self.client.pipeline(transaction=False) as pipe:
            for _, item, _, _ in drops:
                pipe.zrangebyscore(self.keys.price_watchers(item), now - WATCH_S, "+inf")
            watchers = await pipe.execute()
        async with self.client.pipeline(transaction=True) as pipe:
            for (drop_id, item, old, new), users in zip(drops, watchers, strict=True):
                for user in (u.decode() for u in users):
                    drop = {"user": user, "item": item, "old": old, "new": new, "drop": drop_id}
                    pipe.zadd(
                        self.keys.push_due(), {PRICE_QUEUE + ":" + orjson.dumps(drop).decode(): now}, nx=True
                    )
            pipe.xack(self.keys.price_drops(), self.group, *[entry_id for entry_id, _ in entries])
            await pipe.execute()
        return True

    async def _decide_price_drop(self, member: bytes, drop: dict[str, Any], now: float) -> None:
        """A watched item got cheaper: push it if it is still on the shopper's list, once they are
        not active (an active shopper is considered again when they would count as gone)."""
        claims, claimed = self.keys.push_due_claims(), self._claimer + member
        user = drop["user"]
        activity = _activity(await self.client.hgetall(self.keys.push_activity(user)))
        back_at = activity.last + self.policy.away_after_s
        if back_at > now:  # in the shop: never while active
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(self.keys.push_due(), {member: back_at})
                pipe.zrem(claims, claimed)
                await pipe.execute()
            return
        await self._decide(member, user, PRICE_QUEUE, now, drop, activity)

    async def _decide(
        self,
        member: bytes,
        user: str,
        queue: str,
        now: float,
        drop: dict[str, Any] | None = None,
        activity: Activity | None = None,
    ) -> None:
        """One shopper has left (``queue`` away), or left a cart, or an item they watch got cheaper
        (``drop``): hold a push for them, or say why not. ``activity``: theirs, if already read."""
        claims, member = self.keys.push_due_claims(), self._claimer + member
        stored = await self.store.read(user)
        if stored is None:  # forgotten meanwhile
            await self.client.zrem(claims, member)
            return
        if queue == AWAY_QUEUE and not stored.away and self.away_list_wait_s:
            activity = _activity(await self.client.hgetall(self.keys.push_activity(user)))
            if now < activity.last + self.policy.away_after_s + self.away_list_wait_s:
                async with self.client.pipeline(transaction=True) as pipe:  # wait for the away list
                    again = {member.removeprefix(self._claimer): now + AWAY_LIST_POLL_S}
                    pipe.zadd(self.keys.push_due(), again, gt=True)  # (back since: a later one stays)
                    pipe.zrem(claims, member)
                    await pipe.execute()
                return
        sent_key, items_key = self.keys.pushes(user), self.keys.pushed_items(user)
        push_id = f"{user}:{stored.version}:{queue}"  # one push per list and queue (and dropped item)
        if drop is not None:
            push_id += f":{drop['item']}"
        if await self.client.zscore(sent_key, push_id) is not None:
            # Considered again with no new list (a burst of refresh entries): pushed already.
            await self.client.zrem(claims, member)
            self.metrics.pushes.labels(DEDUPED).inc()
            return
        when_away = queue == AWAY_QUEUE
        items = stored.items
        ids, reasons = [i["item_id"] for i in items], [i.get("reason") or "" for i in items]
        scores = [i.get("score") or 0.0 for i in items]
        if drop is None:
            candidates = self.policy.candidates(when_away, ids, scores, reasons)
        else:  # the cheaper item, if it is still on their list
            candidates = [
                Candidate(i, s, PRICE_DROP) for i, s in zip(ids, scores, strict=True) if i == drop["item"]
            ]
        if when_away:
            await self._watch(user, self.policy.watched(ids, reasons), now)
        if not when_away and not candidates:  # nothing in the cart (no longer listed): no decision
            await self.client.zrem(claims, member)
            return
        if self.segment is not None and self.segment not in stored.tags:
            await self.client.zrem(claims, member)
            self.metrics.push_entries.labels(OUTSIDE_SEGMENT).inc()
            return
        if activity is None:
            activity = _activity(await self.client.hgetall(self.keys.push_activity(user)))
        recent = await self.client.zrangebyscore(
            sent_key, now - self.policy.cap_window_s, "+inf", withscores=True
        )
        pushed = await self.client.zrangebyscore(
            items_key, now - self.policy.dedupe_window_s, "+inf", withscores=True
        )
        decision = self.policy.choose(
            candidates,
            now,
            [t for _, t in recent],
            {item.decode(): t for item, t in pushed},
            self.policy.budget(activity.recent_visits(now)),
            await self._bar(),
        )
        if (score := self._recent.note(decision)) is not None:
            await self._share_score(score)
        trigger = decision.trigger or (AWAY if when_away else PRICE_DROP if drop else CART)
        self.metrics.push_decisions.labels(trigger, decision.outcome).inc()
        if decision.outcome != SENT or decision.item is None:
            await self._log_exposure(self._not_sent(push_id, stored, decision, trigger, now))
            await self.client.zrem(claims, member)
            self.metrics.pushes.labels(decision.outcome).inc()
            return
        send_at = self.policy.send_time(now, activity.hours, await self._common())
        notification = await self._notification(push_id, stored, decision.item, trigger, now, send_at)
        if drop is not None:
            notification.update(
                reason=f"now {drop['new']:g} instead of {drop['old']:g}",
                price=drop["new"],
                old_price=drop["old"],
            )
        async with self.client.pipeline(transaction=True) as pipe:
            # Held pushes count against the budget and the dedupe window from now on.
            pipe.zadd(sent_key, {push_id: send_at})
            pipe.zadd(items_key, {decision.item: send_at})
            pipe.zremrangebyscore(sent_key, "-inf", now - self.policy.cap_window_s)
            pipe.zremrangebyscore(items_key, "-inf", now - self.policy.dedupe_window_s)
            pipe.zadd(self.keys.push_held(), {orjson.dumps(notification): send_at})
            pipe.zrem(claims, member)
            await pipe.execute()
        if send_at > now:
            log.debug(
                "push %s held until %s", push_id, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(send_at))
            )
            if self.policy.in_quiet_hours(now):
                self.metrics.pushes.labels(QUIET_HOURS).inc()

    async def _watch(self, user: str, items: list[str], now: float) -> None:
        """The shopper watches the prices of these items (engaged with, and on their list)."""
        if not items:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.zadd(self.keys.price_watchers(item), {user: now})
                pipe.zremrangebyscore(self.keys.price_watchers(item), "-inf", now - WATCH_S)
                pipe.expire(self.keys.price_watchers(item), WATCH_S)
            await pipe.execute()

    async def _common(self) -> dict[int, float]:
        """The hours of week in which shoppers' visits begin (read at most once a minute)."""
        if time.monotonic() - self._common_read_at > 60:
            self._common_hours = _hours(await self.client.hgetall(self.keys.push_hours()))
            self._common_read_at = time.monotonic()
        return self._common_hours

    async def _bar(self) -> float:
        """The recent bar a push must clear: the group's last pushes' scores, read at most once a
        minute, and this sender's own since."""
        quantile = self.policy.min_score_quantile
        if quantile > 0 and time.monotonic() - self._recent_read_at > 60:
            newest_first = await self.client.lrange(self.keys.push_scores(), 0, self.policy.score_window - 1)
            self._recent.replace(float(score) for score in reversed(newest_first))
            self._recent_read_at = time.monotonic()
        bar = self._recent.bar(quantile)
        self.metrics.push_score_bar.set(bar)
        return bar

    async def _share_score(self, score: float) -> None:
        """A score this sender counted in its recent bar goes to the group's too."""
        if self.policy.min_score_quantile > 0:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.lpush(self.keys.push_scores(), score)
                pipe.ltrim(self.keys.push_scores(), 0, self.policy.score_window - 1)
                await pipe.execute()

    async def _deliver_held(self) -> bool:
        """Deliver every held push whose send time has come; whether there was any."""
        now = self.clock()
        due = await self._claim(self.keys.push_held(), self.keys.push_held_claims(), now)
        self.metrics.push_held.set(await self.client.zcard(self.keys.push_held()))
        for member in due:
            await self._deliver(member, orjson.loads(member), now)
        return bool(due)

    async def _deliver(self, member: bytes, notification: dict[str, Any], now: float) -> None:
        user, push_id, item = notification["user_id"], notification["push_id"], notification["item_id"]
        sent_key, items_key = self.keys.pushes(user), self.keys.pushed_items(user)
        group = HOLDOUT if self._in_holdout(user) else TREATED
        last = await self.client.hget(self.keys.push_activity(user), "last")
        if last is not None and float(last) > notification["decided_at"]:
            outcome = ACTIVE  # back in the shop before it was sent: their next departure decides
        elif group == HOLDOUT:
            outcome = HOLDOUT  # the control group: would have been sent now, and is not
        elif self.delivery.delivered_before(push_id):
            outcome = ALREADY_SENT  # delivered before a crash that came before the record below
        else:
            outcome = await self.delivery.deliver({**notification, "sent_at": now})
        sent = outcome in (SENT, ALREADY_SENT, HOLDOUT)  # the holdout's count like sent ones
        await self._log_exposure(
            {
                **_exposed(notification),
                "decision": SENT if outcome == ALREADY_SENT else outcome,
                "group": group,
                "delivered_at": now if sent else None,
            }
        )
        async with self.client.pipeline(transaction=True) as pipe:
            if sent:
                self.attribution.remember(pipe, notification, group, now)
                pipe.zadd(sent_key, {push_id: now})
                pipe.zadd(items_key, {item: now})
            else:  # not sent: it counts against neither the budget nor the dedupe window
                pipe.zrem(sent_key, push_id)
                pipe.zrem(items_key, item)
            pipe.zrem(self.keys.push_held_claims(), self._claimer + member)
            await pipe.execute()
        self.delivery.recorded(push_id)  # Redis answers for it now
        if outcome == ALREADY_SENT:
            self.metrics.push_entries.labels(ALREADY_SENT).inc()
            return
        self.metrics.pushes.labels(outcome).inc()
        if outcome in (SENT, HOLDOUT):
            self.metrics.push_delivered.labels(notification["trigger"], group).inc()

    def _in_holdout(self, user: str) -> bool:
        return in_holdout(user, self.holdout_share, self.holdout_salt)

    async def _log_exposure(self, record: dict[str, Any]) -> None:
        assert self.exposures is not None, "run() opens the exposure log"
        await self.exposures.write(record)

    def _not_sent(
        self, push_id: str, stored: StoredList, decision: Decision, trigger: str, now: float
    ) -> dict[str, Any]:
        """The exposure record of a decision that held no push (capped, below the threshold)."""
        return {
            **dict.fromkeys(_EXPOSED_FIELDS),  # no item, rank, score, reason
            "push_id": push_id,
            "user_id": stored.user_id,
            "score": decision.score,  # below_recent: the best candidate's, under the bar
            "trigger": trigger,
            "list_version": stored.version,
            "policy_version": self.policy.version,
            "segment": _segment(stored),
            "decided_at": now,
            "decision": decision.outcome,
            "group": HOLDOUT if self._in_holdout(stored.user_id) else TREATED,
            "delivered_at": None,
        }

    async def _claim_abandoned(self, stream: str) -> list:  # type: ignore[type-arg]
        """Entries of ``stream`` (refreshes or price drops) another sender of the group read and
        never acked (it crashed, or its host is gone)."""
        _, claimed, deleted = await self.client.xautoclaim(
            stream, self.group, self.consumer, int(self.claim_idle_s * 1000), "0-0", count=100
        )
        if claimed:
            log.info("claimed %d entries of %s abandoned by another sender", len(claimed), stream)
        if deleted:  # XAUTOCLAIM drops them from the group's pending list
            if stream == self.keys.refreshed():
                self._lost_to_trimming(len(deleted), "read by another sender but not decided")
            else:
                log.warning("%d price drops read by a sender that crashed were trimmed: lost", len(deleted))
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

    async def _notification(
        self, push_id: str, stored: StoredList, item: str, trigger: str, now: float, send_at: float
    ) -> dict[str, Any]:
        rank, listed = next(((k, i) for k, i in enumerate(stored.items) if i["item_id"] == item), (None, {}))
        title = await self.client.hget(self.keys.item(item), "title")  # None without a catalogue
        return {
            "notification_id": push_id,
            "push_id": push_id,
            "user_id": stored.user_id,
            "item_id": item,
            "title": title.decode() if title is not None else None,
            "score": listed.get("score"),
            "reason": listed.get("reason"),
            "trigger": trigger,
            "list_version": stored.version,
            "model": stored.model,
            "decided_at": now,
            "send_at": send_at,
            "rank": rank,
            "policy_version": self.policy.version,
            "segment": _segment(stored),
        }


# What the exposure record keeps of a notification (stream.exposures).
_EXPOSED_FIELDS = (
    "push_id",
    "user_id",
    "item_id",
    "rank",
    "score",
    "trigger",
    "reason",
    "list_version",
    "policy_version",
    "segment",
    "decided_at",
)


def _exposed(notification: dict[str, Any]) -> dict[str, Any]:
    return {name: notification.get(name) for name in _EXPOSED_FIELDS}


def _segment(stored: StoredList) -> str | None:
    """The shopper's interest segment as the report groups by it (None without a catalogue)."""
    return " / ".join(stored.tags) or None


_HOUR = "h{}"  # the field of an hour of week in the activity and common-hours hashes


def _hours(fields: dict[bytes, bytes]) -> dict[int, float]:
    """Hour of week -> visits, from a hash's ``h<hour>`` fields."""
    return {int(k[1:]): float(v) for k, v in fields.items() if k.startswith(b"h")}


def _activity(fields: dict[bytes, bytes]) -> Activity:
    """A shopper's activity as the sender keeps it (a Redis hash: last, visits, h<hour of week>)."""
    return Activity(float(fields.get(b"last", -math.inf)), float(fields.get(b"visits", 0.0)), _hours(fields))


def run_push_sender(sender: PushSender, metrics_port: int | None = None) -> None:
    if metrics_port is not None:
        sender.metrics.watch_cpu({"push_sender": os.getpid()})
        sender.metrics.serve(metrics_port)
    asyncio.run(sender.run())
