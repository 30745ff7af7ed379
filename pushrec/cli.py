"""The `pushrec` command line: the parser and the dispatch; each command lives in
``pushrec/commands/``. One-line errors; exit 2 on usage errors."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from redis.exceptions import RedisError

from infra.logs import setup_logging
from infra.settings import ConfigError, load_settings
from infra.stack import StackError
from pushrec import commands
from pushrec.commands._shared import CommandError, UsageError
from stream.replay import ReplayError
from stream.topics import TopicError

EXIT_FAILURE, EXIT_USAGE = 1, 2
log = logging.getLogger("pushrec")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pushrec",
        description="Streaming, real-time recommendations for push notifications.",
        epilog="Configuration comes from PUSHREC_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for command in commands.ALL:
        command.add_parser(sub)
    return parser


# Long-running services with their own orderly stop on SIGTERM (Faust's, the sender's loop).
SERVICES = frozenset({"worker", "push-sender"})


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in SERVICES:
        # SIGTERM (``kill``, ``timeout``) stops a command as Ctrl-C does: the embedded servers and
        # child processes it started (bench, demo) are stopped on the way out, not left running.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"pushrec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings)
    try:
        return int(args.run(args, settings))
    except UsageError as exc:
        print(f"pushrec {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StackError, TopicError, ReplayError, CommandError) as exc:
        print(f"pushrec {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"pushrec {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RedisError, OSError) as exc:  # e.g. a server went away after retries
        print(f"pushrec {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
