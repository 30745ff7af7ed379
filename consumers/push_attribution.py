"""Live attribution in the push sender: which delivered pushes were opened, dismissed, converted.

The sender remembers every push it delivered (and every holdout push it would have delivered)
for the attribution window, in a hash per shopper (``push:delivered:<user>``: push id -> item,
trigger, group, time). This follower reads the click, add_to_cart, purchase, push_open and
push_dismiss topics, its offsets committed to the group ``<push consumer group>-attribution`` (from
the end when there are none), and counts:

- an **open** (a dismissal) when a ``push_open`` (``push_dismiss``) carries a delivered push's id;
- a **conversion** when the shopper clicks, carts or buys a pushed item within
  ``attribution_window_s`` after delivery (for the holdout: a would-be conversion, the baseline
  the treated rate is compared with).

Each is counted once across the group, restarts and redelivered records: the first to set its
mark in the shopper's ``push:attributed:<user>`` hash (HSETNX) counts it. ``pushrec push-report``
computes the same from the exposure log and the topics, over any period.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis

from infra.kafka import KafkaAccess
from infra.metrics import Metrics
from infra.settings import Settings
from infra.store import Keys
from online_models.push_policy import HOLDOUT
from online_models.push_report import DISMISS, ENGAGING, OPEN, converts
from stream.events import BadEvent, decode_event
from stream.topics import TopicNames

log = logging.getLogger("pushrec.push_sender")
_MARK = {OPEN: "o:", DISMISS: "d:"}  # field prefixes of the marks; conversions: "c:"
_KEEP_S = 86_400.0  # a delivered push is remembered this long past its window


class PushAttribution:
    """Follows the engagement and answer topics; counts opens, dismissals, conversions."""

    def __init__(
        self, settings: Settings, kafka: KafkaAccess, client: aioredis.Redis, keys: Keys, metrics: Metrics
    ) -> None:
        self.kafka, self.client, self.keys, self.metrics = kafka, client, keys, metrics
        names = TopicNames(settings.kafka.topic_prefix)
        self.topics = [names.events(kind) for kind in (*ENGAGING, OPEN, DISMISS)]
        self.group = f"{settings.push.consumer_group}-attribution"
        self.window_s = settings.push.attribution_window_s
        self.limits = settings.events.limits
        self._consumer: Any = None

    def remember(self, pipe: Any, notification: dict[str, Any], group: str, now: float) -> None:
        """Within the sender's transaction that records a delivery (or a holdout's would-be one)."""
        key = self.keys.push_delivered(notification["user_id"])
        entry = {
            "item": notification["item_id"],
            "trigger": notification["trigger"],
            "group": group,
            "at": now,
        }
        pipe.hset(key, notification["push_id"], orjson.dumps(entry))
        pipe.expire(key, int(self.window_s + _KEEP_S))

    async def open(self) -> None:
        self._consumer = await asyncio.to_thread(self._assigned)

    def _assigned(self) -> Any:
        """A consumer of every partition of the topics (the sender created them), from the group's
        committed offsets, or from the end where there are none (older events predate the pushes
        it can attribute).

        Every sender reads every partition: subscribed as a group from the sender (polled from a
        worker thread), kafka-python 3.0.12 re-joined the embedded Tansu broker's group in a loop
        and never consumed, with the topics present too (a script polling from its main thread
        joined in 3 s). N senders read the answers N times; the marks still count each once."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            **self.kafka.client_options(),
            group_id=self.group,
            enable_auto_commit=False,
            client_id="pushrec-push-attribution",
        )
        known = {topic: consumer.partitions_for_topic(topic) for topic in self.topics}
        missing = [topic for topic, parts in known.items() if not parts]
        if missing:
            log.warning("attribution: no partitions of %s on %s: not counted", missing, self.kafka)
        partitions = [TopicPartition(topic, p) for topic in self.topics for p in sorted(known[topic] or ())]
        consumer.assign(partitions)
        for tp in partitions:
            if consumer.committed(tp) is None:
                consumer.seek_to_end(tp)
                consumer.position(tp)  # now: seek_to_end is lazy, and would skip what comes meanwhile
        return consumer

    @property
    def reading(self) -> bool:
        """Whether it reads (from :meth:`open` on, at known positions)."""
        return self._consumer is not None

    async def close(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.close)
            self._consumer = None

    async def follow(self) -> bool:
        """Read what has arrived (without waiting), count it, commit; whether there was any."""
        polled = await asyncio.to_thread(self._consumer.poll, timeout_ms=0, max_records=2000)
        events = []
        for messages in polled.values():
            for message in messages:
                try:
                    events.append(decode_event(message.value, self.limits))
                except BadEvent:  # the worker dead-letters it; it is no engagement
                    continue
        if events:
            await self._count(events)
        if polled:
            await asyncio.to_thread(self._consumer.commit)
        return bool(polled)

    async def _count(self, events: list[Any]) -> None:
        users = list(dict.fromkeys(ev.user_id for ev in events))
        async with self.client.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.hgetall(self.keys.push_delivered(user))
            stored = dict(zip(users, await pipe.execute(), strict=True))
        pushes = {
            user: {k.decode(): orjson.loads(v) for k, v in fields.items()}
            for user, fields in stored.items()
            if fields
        }
        marks: list[tuple[str, str, str, dict[str, Any]]] = []  # (what, user, mark, push)
        for ev in events:
            mine = pushes.get(ev.user_id)
            if not mine:
                continue
            if ev.type in _MARK:
                push = mine.get(ev.push_id or "")
                if push is not None and push["group"] != HOLDOUT:
                    marks.append((ev.type, ev.user_id, _MARK[ev.type] + str(ev.push_id), push))
                continue
            for push_id, push in mine.items():
                if converts(push["item"], push["at"], ev, self.window_s):
                    marks.append(("conversion", ev.user_id, "c:" + push_id, push))
        if not marks:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for _, user, mark, _ in marks:
                key = self.keys.push_attributed(user)
                pipe.hsetnx(key, mark, 1)
                pipe.expire(key, int(self.window_s + _KEEP_S))
            firsts = (await pipe.execute())[::2]
        for (kind, _, _, push), first in zip(marks, firsts, strict=True):
            if not first:
                continue
            if kind == OPEN:
                self.metrics.push_opens.labels(push["trigger"]).inc()
            elif kind == DISMISS:
                self.metrics.push_dismissals.labels(push["trigger"]).inc()
            else:
                self.metrics.push_conversions.labels(push["trigger"], push["group"]).inc()
