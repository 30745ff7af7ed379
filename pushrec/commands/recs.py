"""`pushrec recs USER_ID`: the user's current top-N as stored in Redis."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from infra.settings import Settings
from infra.stack import require_servers, resolve_addresses
from infra.store import Keys, RedisTopNStore, connect
from pushrec.commands._shared import CommandError, Subcommands, emit


def add_parser(sub: Subcommands) -> None:
    recs = sub.add_parser("recs", help="show a user's current top-N from Redis")
    recs.add_argument("user_id", metavar="USER_ID")
    recs.add_argument("--json", action="store_true")
    recs.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    _, redis_url = resolve_addresses(settings)
    require_servers(None, redis_url)

    async def read() -> dict[str, object] | None:
        client = connect(redis_url, retries=1)
        try:
            stored = await RedisTopNStore(client, Keys(settings.redis.key_prefix)).read(args.user_id)
        finally:
            await client.aclose()
        return stored.to_dict() if stored else None

    stored = asyncio.run(read())
    if stored is None:
        raise CommandError(f"no list stored for user {args.user_id!r}")
    text = [f"user {args.user_id}: version {stored['version']}, model {stored['model']}"]
    tags: list[str] = stored["tags"]  # type: ignore[assignment]
    items: list[dict[str, Any]] = stored["items"]  # type: ignore[assignment]
    if tags:
        text.append(f"  interest segment: {', '.join(tags)}")
    text += [
        f"  {n:2d}. {i['item_id']}  {i['score']:.4f}" + (f"  ({i['reason']})" if i.get("reason") else "")
        for n, i in enumerate(items, 1)
    ]
    emit(args, stored, "\n".join(text))
    return 0
