"""`pushrec forget USER_ID`: erase a user everywhere pushrec keeps them.

- Redis: their list, push history (cap and dedupe sets), push activity, pending push
  considerations (price drops too) and held pushes, the item prices they watch, their
  delivered pushes and attribution marks (the exposures Redis holds), and their entries on the
  refresh stream.
- The model, the event-id memory and the checkpoint: a running worker applies the request from
  the forget stream, checkpoints, and leaves a result; with no worker answering within the wait,
  the checkpoint in the store is edited here and the request stays for the worker to apply
  when it next runs.

Not erased (documented in the README, and said in the report's ``stays_until_retention``): the
user's records still in Kafka topics until their retention expires (their events, their push
answers, and the exposure log ``pushrec.pushes``), and notifications already handed to the
delivery channel (the outbox).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumers.push_sender import AWAY_QUEUE, CART_QUEUE, PRICE_QUEUE
from consumers.recovery import ITEMS, checkpoint_set, erase_from_partition
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, connect
from stream.topics import TopicNames


async def forget_user(settings: Settings, redis_url: str, user: str, wait_s: float) -> dict[str, Any]:
    client = connect(redis_url, settings.redis.retries)
    keys = Keys(settings.redis.key_prefix)
    try:
        report: dict[str, Any] = {"user_id": user}
        lists, report["refresh_stream_entries"] = await RedisTopNStore(client, keys).delete_lists(user)
        report["redis_keys"] = lists + await client.delete(
            keys.pushes(user),
            keys.pushed_items(user),
            keys.push_activity(user),
            keys.push_delivered(user),
            keys.push_attributed(user),
        )
        report["stays_until_retention"] = _in_kafka(settings)
        report["pending_pushes"] = await _forget_pushes(client, keys, user)
        request_id = (await client.xadd(keys.forget_requests(), {"user": user})).decode()
        result = await _wait_for_worker(client, keys, request_id, wait_s)
        if result is not None:
            report["model"] = {"applied_by": "worker", **result}
        else:
            report["model"] = {"applied_by": "checkpoint", **await _edit_checkpoint(settings, client, user)}
            report["model"]["request"] = "pending: a worker applies it when it next runs"
        return report
    finally:
        await client.aclose()


def _in_kafka(settings: Settings) -> list[str]:
    """The topics that keep the user's records until their retention: Kafka cannot erase one record."""
    names = TopicNames(settings.kafka.topic_prefix)
    return [*names.all_events, names.pushes, names.dead_letter]


async def _forget_pushes(client: aioredis.Redis, keys: Keys, user: str) -> int:
    """Drop the user's push considerations and held pushes; how many."""
    dropped = int(await client.zrem(keys.push_due(), f"{AWAY_QUEUE}:{user}", f"{CART_QUEUE}:{user}"))
    price = f"{PRICE_QUEUE}:".encode()
    async for member, _ in client.zscan_iter(keys.push_due(), match=price + b"*"):
        if orjson.loads(member[len(price) :]).get("user") == user:
            dropped += int(await client.zrem(keys.push_due(), member))
    async for member, _ in client.zscan_iter(keys.push_held()):
        if orjson.loads(member).get("user_id") == user:
            dropped += int(await client.zrem(keys.push_held(), member))
    async for watch in client.scan_iter(match=keys.price_watchers("*")):  # the prices they watch
        await client.zrem(watch, user)
    return dropped


async def _wait_for_worker(
    client: aioredis.Redis, keys: Keys, request_id: str, wait_s: float
) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        raw = await client.get(keys.forget_result(request_id))
        if raw is not None:
            await client.delete(keys.forget_result(request_id))
            return orjson.loads(raw)  # type: ignore[no-any-return]
        await asyncio.sleep(0.2)
    return None


async def _edit_checkpoint(settings: Settings, client: aioredis.Redis, user: str) -> dict[str, Any]:
    """Erase the user from whichever partition checkpoints hold them."""
    store = checkpoint_set(settings, client)
    if store is None:
        return {"checkpoint": "none"}
    result: dict[str, Any] = {"model": False, "dedupe_ids": 0, "pending_list": False, "checkpoint": "none"}
    for name in await store.parts():
        if name == ITEMS:
            continue
        part = store.part(name)
        blob = await part.load()
        erased = erase_from_partition(blob, user) if blob is not None else None
        if erased is None:
            continue
        blob, removed = erased
        await part.save(blob)
        result["model"] = result["model"] or removed["model"]
        result["dedupe_ids"] += removed["dedupe_ids"]
        result["pending_list"] = result["pending_list"] or removed["pending_list"]
        result["checkpoint"] = part.where
    return result
