"""Redis: the one key builder, the connection (with bounded retry), and the top-N list store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

# Redis not taking a command: unreachable or slow (the client retries these), or answering with
# an error (over maxmemory with noeviction, a replica after a failover, a flushed script cache).
# An outage to wait out with lists kept pending, not a bug to crash on.
REDIS_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ResponseError)
REDIS_ERROR_KINDS = ("connection", "timeout", "oom", "readonly", "noscript", "other")


def redis_error_kind(exc: BaseException) -> str:
    """The ``kind`` label of ``pushrec_redis_errors_total`` for one of REDIS_UNAVAILABLE."""
    for kind, types in (
        ("timeout", RedisTimeoutError),
        ("connection", RedisConnectionError),
        ("oom", OutOfMemoryError),
        ("readonly", ReadOnlyError),
        ("noscript", NoScriptError),
    ):
        if isinstance(exc, types):
            return kind
    return "other"


class Keys:
    """Every Redis key pushrec uses, built here and nowhere else."""

    def __init__(self, prefix: str = "pushrec:") -> None:
        self.prefix = prefix

    def recs(self, user: str) -> str:
        return f"{self.prefix}recs:{user}"

    def refreshed(self) -> str:
        """The stream that tells the push sender a list changed."""
        return f"{self.prefix}refreshed"

    def refreshed_trimmed(self) -> str:
        """Hash: how many trimmed refresh entries the senders have counted (see push_sender)."""
        return f"{self.prefix}refreshed:trimmed"

    def pushed_items(self, user: str) -> str:
        """Sorted set item -> time it was last pushed to the user (dedupe)."""
        return f"{self.prefix}push:items:{user}"

    def pushes(self, user: str) -> str:
        """Sorted set push id -> its send time (the budget; held pushes count from their decision)."""
        return f"{self.prefix}push:sent:{user}"

    def push_activity(self, user: str) -> str:
        """Hash: when the user was last active, their recent visits, the hours their visits began."""
        return f"{self.prefix}push:activity:{user}"

    def push_scores(self) -> str:
        """List: the scores of the last pushes that cleared the relevance threshold, newest first
        (the recent bar, shared by the senders)."""
        return f"{self.prefix}push:scores"

    def push_hours(self) -> str:
        """Hash: hour of week -> visits begun in it, every user's (the send hour's fallback)."""
        return f"{self.prefix}push:hours"

    def push_due(self) -> str:
        """Sorted set "away:<user>" / "cart:<user>" / "price:" + JSON (user, item, prices) -> when
        a push is considered for them."""
        return f"{self.prefix}push:due"

    def push_due_claims(self) -> str:
        """Sorted set: due considerations a sender is deciding -> when it took them."""
        return f"{self.prefix}push:due:claims"

    def push_held(self) -> str:
        """Sorted set: decided notifications (JSON) -> their send time."""
        return f"{self.prefix}push:held"

    def push_held_claims(self) -> str:
        """Sorted set: held notifications a sender is delivering -> when it took them."""
        return f"{self.prefix}push:held:claims"

    def push_delivered(self, user: str) -> str:
        """Hash: push id -> item, trigger, group, time of each push delivered to the user (or
        withheld from them, in the holdout) within the attribution window."""
        return f"{self.prefix}push:delivered:{user}"

    def push_attributed(self, user: str) -> str:
        """Hash: the user's pushes already counted as opened, dismissed, converted (o:/d:/c:<id>)."""
        return f"{self.prefix}push:attributed:{user}"

    def push_dead_letters(self) -> str:
        """The stream of pushes the gateway refused for good (notification, reason, time)."""
        return f"{self.prefix}push:dead-letters"

    def price_drops(self) -> str:
        """The stream of catalogue prices that fell (item, old and new price), for the push sender."""
        return f"{self.prefix}price-drops"

    def price_watchers(self, item_id: str) -> str:
        """Sorted set: users who engaged with the item (and had it listed) -> when that was seen."""
        return f"{self.prefix}push:watch:{item_id}"

    def item(self, item_id: str) -> str:
        """Hash: a catalogue item's title, category, price."""
        return f"{self.prefix}item:{item_id}"

    def checkpoint(self, name: str) -> str:
        """A worker's model checkpoint (when checkpoints are kept in Redis)."""
        return f"{self.prefix}checkpoint:{name}"

    def forget_requests(self) -> str:
        """The stream of `pushrec forget` requests that running workers apply to their models."""
        return f"{self.prefix}forget"

    def forget_result(self, request_id: str) -> str:
        """What a worker removed for one forget request (counts only; expires after an hour)."""
        return f"{self.prefix}forget:result:{request_id}"


# redis-py types every reply as bytes | str, since it cannot know ``decode_responses``; each
# client pushrec makes (``connect``) leaves replies undecoded, so they are bytes: said once, here.
def reply_bytes(reply: object) -> bytes | None:
    return cast(bytes | None, reply)


def reply_hash(reply: object) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], reply)


def reply_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries (XRANGE, XREADGROUP): (id, fields)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])


def connect(url: str, retries: int = 5) -> aioredis.Redis:
    """An asyncio client that retries connection errors with capped exponential backoff."""
    return aioredis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5.0,
        socket_timeout=10.0,
    )


@dataclass(frozen=True, slots=True)
class StoredList:
    """A user's list as the push sender and `pushrec recs` see it."""

    user_id: str
    items: list[dict[str, Any]]
    version: int
    refreshed_at: float
    model: str
    tags: list[str]  # the user's interest segment's name (empty without a catalogue)
    away: bool = False  # ranked for a shopper who had left (the list a push carries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "items": self.items,
            "version": self.version,
            "refreshed_at": self.refreshed_at,
            "model": self.model,
            "tags": self.tags,
            "away": self.away,
        }


class RankedList(Protocol):
    """What the store writes (``online_models.recommender.TopN`` has it)."""

    @property
    def user_id(self) -> str: ...
    @property
    def items(self) -> list[str]: ...
    @property
    def scores(self) -> list[float]: ...
    @property
    def model(self) -> str: ...
    @property
    def reasons(self) -> list[str]: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def away(self) -> bool: ...


class CatalogueItem(Protocol):
    """What the store keeps of a catalogue item (``stream.events.Item`` has it)."""

    @property
    def item_id(self) -> str: ...
    @property
    def title(self) -> str | None: ...
    @property
    def category(self) -> str | None: ...
    @property
    def price(self) -> float | None: ...


# Lists in one script call, each atomic (scripts run whole): give it a new version, store it, tell
# the sender. KEYS: the refresh stream, then one hash per list; ARGV: time, stream MAXLEN, then per
# list: items, model, user id, tags, away ('1': ranked for a shopper who has left; its stream entry
# says so, for it is no activity of theirs). One call per chunk instead of one per list: redis-py's
# command packing and reply parsing were ~11 % of the model process's CPU (py-spy).
# A version never goes backwards, even when the hash is gone (forget, an eviction, an embedded
# Valkey restarted without persistence): the server's time in microseconds, or the previous
# version + 1 if that is larger. The push sender's idempotency key (user, version) stays unique.
_WRITE_LISTS = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local versions = {}
for i = 2, #KEYS do
  local a = 3 + (i - 2) * 5
  local previous = tonumber(redis.call('HGET', KEYS[i], 'version') or 0)
  local version = math.max(previous + 1, now_us)
  redis.call('HSET', KEYS[i], 'version', string.format('%d', version), 'items', ARGV[a],
             'refreshed_at', ARGV[1], 'model', ARGV[a + 1], 'tags', ARGV[a + 3], 'away', ARGV[a + 4])
  local entry = {'user_id', ARGV[a + 2], 'version', string.format('%d', version)}
  if ARGV[a + 4] == '1' then
    entry[5], entry[6] = 'away', '1'
  end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(entry))
  versions[#versions + 1] = version
end
return versions
"""
_LISTS_PER_CALL = 200  # bounds how long one call holds Redis (~1 ms)

# One catalogue item's text and price; a price lower than the one stored is told to the push
# sender. KEYS: the item's hash, the price-drop stream; ARGV: title, category, price ('' = not
# given), the item id, the stream's MAXLEN.
_WRITE_ITEM = """
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'title', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'category', ARGV[2]) end
if ARGV[3] ~= '' then
  local old = redis.call('HGET', KEYS[1], 'price')
  redis.call('HSET', KEYS[1], 'price', ARGV[3])
  if old and tonumber(old) and tonumber(ARGV[3]) < tonumber(old) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'item_id', ARGV[4], 'old', old, 'new', ARGV[3])
  end
end
"""


# A Lua script's call: the script, its keys, its arguments.
_ScriptCall = tuple[AsyncScript, list[Any], list[Any]]


class RedisTopNStore:
    """Top-N lists as one hash per user, plus a refresh stream for the push sender."""

    def __init__(self, client: aioredis.Redis, keys: Keys, stream_maxlen: int = 100_000) -> None:
        self.client = client
        self.keys = keys
        self.stream_maxlen = stream_maxlen
        self._write = client.register_script(_WRITE_LISTS)
        self._write_item = client.register_script(_WRITE_ITEM)

    async def delete_lists(self, user: str) -> tuple[int, int]:
        """Delete the user's list and their entries on the refresh stream (``forget``); how many
        of each. Reads the whole stream (bounded by its cap) in pages."""
        deleted = await self.client.delete(self.keys.recs(user))
        stream, dropped, start = self.keys.refreshed(), 0, "-"
        encoded = user.encode()
        while True:
            entries = reply_entries(await self.client.xrange(stream, min=start, max="+", count=1000))
            mine = [entry_id for entry_id, fields in entries if fields.get(b"user_id") == encoded]
            if mine:
                dropped += await self.client.xdel(stream, *mine)
            if len(entries) < 1000:
                return int(deleted), dropped
            start = "(" + entries[-1][0].decode()

    async def write_lists(self, lists: Sequence[RankedList], now: float) -> list[int]:
        """Store every list (one script call per chunk, one round trip); return their new versions."""
        if not lists:
            return []
        stream = self.keys.refreshed()
        calls: list[_ScriptCall] = []
        for start in range(0, len(lists), _LISTS_PER_CALL):
            chunk = lists[start : start + _LISTS_PER_CALL]
            args: list[Any] = [repr(now), self.stream_maxlen]
            for top in chunk:
                items = [
                    {"item_id": i, "score": round(s, 6)} for i, s in zip(top.items, top.scores, strict=True)
                ]
                for item, reason in zip(items, top.reasons, strict=False):
                    item["reason"] = reason
                args += (
                    orjson.dumps(items),
                    top.model,
                    top.user_id,
                    orjson.dumps(top.tags),
                    "1" if top.away else "0",
                )
            calls.append((self._write, [stream, *(self.keys.recs(top.user_id) for top in chunk)], args))
        return [int(v) for versions in await self._call(calls) for v in versions]

    async def write_items(self, items: Sequence[CatalogueItem]) -> None:
        """Keep each catalogue item's title, category and price current (one hash per item); a
        price lower than the stored one goes on the price-drop stream for the push sender."""
        drops = self.keys.price_drops()
        calls: list[_ScriptCall] = []
        for item in items:
            fields = (item.title, item.category, None if item.price is None else repr(item.price))
            if any(value is not None for value in fields):
                args: list[Any] = [value or "" for value in fields]
                args += [item.item_id, self.stream_maxlen]
                calls.append((self._write_item, [self.keys.item(item.item_id), drops], args))
        if calls:
            await self._call(calls)

    async def _call(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        """Run script calls in one pipeline, in one round trip: by their SHA, each script loaded
        again only when Redis answers that it lost it (a restart, a SCRIPT FLUSH). redis-py's own
        pipeline of scripts asks SCRIPT EXISTS first, a second round trip per write, each a wait
        for the GIL on the list writes' thread while the model is busy (docs/benchmarks.md)."""
        try:
            return await self._pipeline(calls)
        except NoScriptError:
            for script in {script for script, _, _ in calls}:
                await self.client.script_load(script.script)
            return await self._pipeline(calls)

    async def _pipeline(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return await pipe.execute()

    async def read(self, user: str) -> StoredList | None:
        raw = reply_hash(await self.client.hgetall(self.keys.recs(user)))
        if not raw or b"items" not in raw:
            return None
        return StoredList(
            user_id=user,
            items=orjson.loads(raw[b"items"]),
            version=int(raw[b"version"]),
            refreshed_at=float(raw[b"refreshed_at"]),
            model=raw[b"model"].decode(),
            tags=orjson.loads(raw.get(b"tags", b"[]")),
            away=raw.get(b"away") == b"1",
        )
