"""`pushrec worker`: the Faust worker (ingest, learn, refresh top-N)."""

from __future__ import annotations

import argparse

from infra.settings import Settings
from infra.stack import require_servers, resolve_addresses
from pushrec.commands._shared import Subcommands, add_until_idle, port


def add_parser(sub: Subcommands) -> None:
    worker = sub.add_parser("worker", help="run the Faust worker: ingest, learn, refresh top-N")
    worker.add_argument("--metrics-port", type=port, help="serve Prometheus /metrics on this port")
    add_until_idle(worker, "new events (batch replays, tests)")
    worker.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.ingest import Ingest

    kafka, redis_url = resolve_addresses(settings)
    require_servers(kafka, redis_url)
    Ingest(settings, kafka, redis_url, until_idle_s=args.until_idle).run(args.metrics_port)
    return 0
