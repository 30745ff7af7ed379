"""`pushrec replay`: produce a recorded event log to the topics, keyed by user, in order."""

from __future__ import annotations

import argparse

from infra.settings import Settings
from pushrec.commands._shared import Subcommands, emit, existing_file, kafka_with_topics, positive
from stream.replay import Pacing, Replayer


def add_parser(sub: Subcommands) -> None:
    replay = sub.add_parser("replay", help="produce a recorded event log to the topics")
    replay.add_argument("events", type=existing_file, metavar="EVENTS", help="JSON Lines, may be .gz")
    replay.add_argument(
        "--items", type=existing_file, metavar="ITEMS", help="item catalogue to produce first"
    )
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=positive, metavar="X", help="replay at X times event time")
    pace.add_argument("--rate", type=positive, metavar="N", help="N events per second")
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    kafka, names = kafka_with_topics(settings)
    replayer = Replayer(kafka, names, settings.events.limits)
    try:
        summary = replayer.replay(args.events, args.items, Pacing(rate=args.rate, speedup=args.speedup))
    finally:
        replayer.close()
    result = summary.to_dict()
    lines = [f"replayed {result['events_sent']} events in {result['seconds']}s"]
    lines += [f"  {topic}: {count}" for topic, count in sorted(summary.sent.items())]
    if summary.items_sent:
        lines.append(f"  {names.items}: {summary.items_sent}")
    if summary.rejected:
        lines.append(f"rejected {len(summary.rejected)} lines:")
        lines += [f"  line {n}: {reason} ({detail})" for n, reason, detail in summary.rejected[:20]]
        if len(summary.rejected) > 20:
            lines.append(f"  ... and {len(summary.rejected) - 20} more (see --json)")
    emit(args, result, "\n".join(lines))
    return 0
