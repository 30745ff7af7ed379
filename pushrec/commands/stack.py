"""`pushrec stack up|down|status`: the embedded Kafka broker and Valkey."""

from __future__ import annotations

import argparse

from infra.kafka import KafkaAccess
from infra.settings import Settings
from infra.stack import EmbeddedStack
from pushrec.commands._shared import Subcommands, emit, port
from stream.topics import TopicNames, ensure_topics


def add_parser(sub: Subcommands) -> None:
    stack = sub.add_parser("stack", help="start/stop/inspect the embedded Kafka broker and Valkey")
    actions = stack.add_subparsers(dest="action", required=True, parser_class=type(stack), metavar="ACTION")
    up = actions.add_parser("up", help="start both servers in the background")
    up.add_argument("--kafka-port", type=port, help="broker port (default: a free one)")
    up.add_argument("--redis-port", type=port, help="Valkey port (default: a free one)")
    up.add_argument("--json", action="store_true", help="print the addresses as JSON")
    down = actions.add_parser("down", help="stop both servers")
    down.add_argument("--json", action="store_true")
    status = actions.add_parser("status", help="are they up? (exit 3 if not)")
    status.add_argument("--json", action="store_true")
    stack.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    stack = EmbeddedStack(settings.state_dir)
    if args.action == "up":
        state = stack.up(args.kafka_port, args.redis_port)
        names = TopicNames(settings.kafka.topic_prefix)
        ensure_topics(KafkaAccess(state.kafka_bootstrap), names.all, settings.kafka.partitions)
        emit(
            args,
            {"kafka_bootstrap": state.kafka_bootstrap, "redis_url": state.redis_url},
            f"stack up: kafka={state.kafka_bootstrap} redis={state.redis_url} (state in {stack.state_dir})",
        )
    elif args.action == "down":
        stopped = stack.down()
        emit(args, {"stopped": stopped}, "stack down" if stopped else "stack was not running")
    else:
        status = stack.status()
        text = (
            f"running: kafka={status['kafka_bootstrap']} redis={status['redis_url']}"
            if status["running"]
            else f"not running {_status_detail(status)}"
        )
        emit(args, status, text)
        return 0 if status["running"] else 3
    return 0


def _status_detail(status: dict[str, object]) -> str:
    if "kafka_up" not in status:
        return "(no stack started: run `pushrec stack up`)"
    return f"(kafka up: {status['kafka_up']}, redis up: {status['redis_up']})"
