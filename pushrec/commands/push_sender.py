"""`pushrec push-sender`: refreshed lists become push notifications under the push policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.settings import Settings
from infra.stack import require_servers, resolve_addresses
from pushrec.commands._shared import Subcommands, add_until_idle, port


def add_parser(sub: Subcommands) -> None:
    sender = sub.add_parser("push-sender", help="turn refreshed lists into push notifications")
    sender.add_argument(
        "--outbox",
        type=Path,
        default=Path("outbox.jsonl"),
        help="JSON Lines file the notifications are appended to (default: %(default)s)",
    )
    sender.add_argument(
        "--webhook",
        metavar="URL",
        type=webhook_url,
        help="POST each notification as JSON to the shop's push gateway instead (push id as "
        "Idempotency-Key; retried on timeouts, 408, 429 and 5xx; refused pushes to the push dead letters)",
    )
    sender.add_argument("--metrics-port", type=port, help="serve Prometheus /metrics on this port")
    sender.add_argument(
        "--segment",
        metavar="TAG",
        help="a campaign: push only to users whose interest segment carries this tag (see recs --json)",
    )
    add_until_idle(sender, "refreshed lists")
    sender.set_defaults(run=run)


def webhook_url(text: str) -> str:
    """An http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.push_sender import PushSender, run_push_sender

    kafka, redis_url = resolve_addresses(settings)
    require_servers(kafka, redis_url)  # Kafka for the exposure log (pushrec.pushes)
    sender = PushSender(
        settings,
        kafka,
        redis_url,
        args.outbox,
        until_idle_s=args.until_idle,
        segment=args.segment,
        webhook=args.webhook,
    )
    run_push_sender(sender, args.metrics_port)
    return 0
