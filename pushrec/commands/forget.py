"""`pushrec forget USER_ID`: erase a user everywhere the system keeps them."""

from __future__ import annotations

import argparse
import asyncio

from infra.settings import Settings
from infra.stack import require_servers, resolve_addresses
from pushrec.commands._shared import Subcommands, emit, positive


def add_parser(sub: Subcommands) -> None:
    forget = sub.add_parser(
        "forget",
        help="erase a user from model factors, lists, push history and dedupe state",
        description="Erase USER_ID from Redis (list, push history, refresh stream) and from the model: "
        "a running worker applies the request and checkpoints; otherwise the stored checkpoint is "
        "edited and the request waits for the worker.",
    )
    forget.add_argument("user_id", metavar="USER_ID")
    forget.add_argument(
        "--wait",
        type=positive,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a running worker to apply it (default: %(default)s)",
    )
    forget.add_argument("--json", action="store_true")
    forget.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.forget import forget_user

    _, redis_url = resolve_addresses(settings)
    require_servers(None, redis_url)
    report = asyncio.run(forget_user(settings, redis_url, args.user_id, args.wait))
    model = report["model"]
    text = [
        f"forgot user {args.user_id}:",
        f"  redis keys deleted: {report['redis_keys']} (list, push history, delivered pushes)",
        f"  refresh-stream entries deleted: {report['refresh_stream_entries']}",
        f"  model ({model['applied_by']}): "
        + ", ".join(f"{k}={v}" for k, v in model.items() if k != "applied_by"),
    ]
    emit(args, report, "\n".join(text))
    return 0
