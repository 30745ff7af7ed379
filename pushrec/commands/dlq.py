"""`pushrec dlq list|redrive`: read dead letters by reason, or send them back after a fix."""

from __future__ import annotations

import argparse

from infra.settings import Settings
from pushrec.commands._shared import Subcommands, emit, kafka_with_topics, positive_int
from stream.events import Reason


def add_parser(sub: Subcommands) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="list dead letters by reason, or re-drive them to their source topics after a fix",
        description="list: counts by reason and the first --limit letters. redrive: produce the raw "
        "bytes of each letter (optionally only --reason R) back to the topic it came from; remembers "
        "how far it got, so a second run sends only newer letters.",
    )
    dlq.add_argument("action", choices=("list", "redrive"))
    dlq.add_argument("--reason", action="append", choices=[r.value for r in Reason], metavar="REASON")
    dlq.add_argument("--limit", type=positive_int, default=20, help="letters shown in detail")
    dlq.add_argument("--from-beginning", action="store_true", help="redrive: start over")
    dlq.add_argument("--dry-run", action="store_true", help="redrive: only report what would be sent")
    dlq.add_argument("--json", action="store_true")
    dlq.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from stream.dlq import list_dead_letters, redrive

    kafka, names = kafka_with_topics(settings)
    if args.action == "list":
        report = list_dead_letters(kafka, names.dead_letter, args.limit)
        head = f"{report.total} dead letters in {names.dead_letter}"
    else:
        group = f"{settings.kafka.consumer_group}-dlq-redrive"
        report = redrive(
            kafka, names.dead_letter, group, args.reason or (), args.from_beginning, args.dry_run
        )
        if args.dry_run:
            head = f"would re-drive {report.total} dead letters"
        else:
            sent = report.total - len(report.failed) - len(report.unsendable)
            head = f"re-drove {sent} of {report.total} dead letters"
    lines = [head] + [f"  {reason}: {n}" for reason, n in report.by_reason.most_common()]
    for letter in report.letters[: args.limit]:
        src = letter["source"]
        lines.append(
            f"  [{letter['reason']}] {src['topic']}:{src['partition']}@{src['offset']} "
            f"{letter['detail']!r} raw={letter['raw'][:60]!r}"
        )
    for kind, letters in (("unsendable, passed over", report.unsendable), ("NOT confirmed", report.failed)):
        for letter in letters:
            src = letter["source"]
            lines.append(f"  {kind}: {src['topic']}:{src['partition']}@{src['offset']}: {letter['error']}")
    if report.failed:
        failed = len(report.failed)
        lines.append(f"{failed} send(s) not confirmed: run redrive again to resend from the first")
    emit(args, report.to_dict(), "\n".join(lines))
    return 1 if report.failed else 0
