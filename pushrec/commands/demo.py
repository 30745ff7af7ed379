"""`pushrec demo`: everything, embedded, on the bundled sample log, then clean up."""

from __future__ import annotations

import argparse

from infra.settings import Settings
from pushrec.commands._shared import Subcommands


def add_parser(sub: Subcommands) -> None:
    demo = sub.add_parser("demo", help="run everything on a bundled sample, then clean up")
    demo.add_argument("--users", type=int, default=3, help="how many users' lists to print")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pushrec.demo import run_demo

    return run_demo(settings, users_to_show=args.users)
