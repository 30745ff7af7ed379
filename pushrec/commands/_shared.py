"""What every command shares: argument types, the two errors a command may raise, and output."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from infra.kafka import KafkaAccess
from infra.settings import Settings
from infra.stack import require_servers, resolve_addresses
from stream.topics import TopicNames, ensure_topics

# ``add_subparsers()``'s return type is private to argparse.
Subcommands = Any


class UsageError(Exception):
    """A valid-looking command line that cannot work here; exit code 2."""


class CommandError(Exception):
    """A failure to report as one line with a non-zero exit code."""


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {value}")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def add_until_idle(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--until-idle SECONDS`` option of the long-running commands."""
    parser.add_argument(
        "--until-idle", type=positive, metavar="SECONDS", help=f"exit 0 after this long with no {what}"
    )


def kafka_with_topics(settings: Settings) -> tuple[KafkaAccess, TopicNames]:
    """The configured (or embedded) broker, checked to answer, with pushrec's topics created."""
    kafka, _ = resolve_addresses(settings)
    require_servers(kafka, None)
    names = TopicNames(settings.kafka.topic_prefix)
    ensure_topics(kafka, names.all, settings.kafka.partitions, settings.kafka.replication_factor)
    return kafka, names


def emit(args: argparse.Namespace, data: object, text: str) -> None:
    """``data`` as JSON on stdout with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)
