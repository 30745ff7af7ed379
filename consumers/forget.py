"""`pushrec forget USER_ID`: erase a user everywhere pushrec keeps them.

- Redis: their list, push history (cap and dedupe sets) and their entries on the refresh stream.
- The model, the event-id memory and the checkpoint: a running worker applies the request from
  the forget stream, checkpoints, and leaves a result; with no worker answering within the wait,
  the checkpoint in the store is edited here and the request stays for the worker to apply
  when it next runs.

Not erased (documented in the README): the user's records still in Kafka topics until their
retention expires, and notifications already handed to the delivery channel (the outbox).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumers.recovery import checkpoint_store, erase_user, pack_state, unpack_state
from consumers.worker import build_pipeline
from infra.settings import Settings
from infra.store import Keys, RedisTopNStore, connect
from stream.dedupe import SeenEventIds


async def forget_user(settings: Settings, redis_url: str, user: str, wait_s: float) -> dict[str, Any]:
    client = connect(redis_url, settings.redis.retries)
    keys = Keys(settings.redis.key_prefix)
    try:
        report: dict[str, Any] = {"user_id": user}
        lists, report["refresh_stream_entries"] = await RedisTopNStore(client, keys).delete_lists(user)
        report["redis_keys"] = lists + await client.delete(keys.pushes(user), keys.pushed_items(user))
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
    store = checkpoint_store(settings, client)
    blob = await store.load() if store is not None else None
    if store is None or blob is None:
        return {"checkpoint": "none"}
    pipeline = build_pipeline(settings)
    seen = SeenEventIds(settings.checkpoint.dedupe_ids)
    offsets, pending, items = unpack_state(blob, pipeline, seen)
    result = erase_user(pipeline, seen, user)
    result["pending_list"] = user in pending
    await store.save(pack_state(pipeline, seen, offsets, [u for u in pending if u != user], items))
    return {**result, "checkpoint": store.where}
