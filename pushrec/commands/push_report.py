"""`pushrec push-report`: sends, opens, conversions and the uplift against the holdout group, from
the exposure log (``pushrec.pushes``) and the event topics."""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from typing import Any

from infra.settings import Settings
from pushrec.commands._shared import Subcommands, emit, kafka_with_topics, positive

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def add_parser(sub: Subcommands) -> None:
    report = sub.add_parser(
        "push-report",
        help="what pushes did: sends, opens, conversions, uplift against the holdout group",
        description="Reads the exposure log and the click, add_to_cart, purchase, push_open and "
        "push_dismiss topics from the earliest retained record. A push converts when its item is "
        "clicked, carted or bought within PUSHREC_PUSH__ATTRIBUTION_WINDOW_S after delivery. The "
        "uplift compares shoppers who got pushes with the holdout group (PUSHREC_PUSH__HOLDOUT_SHARE): "
        "the share who engaged, and purchases per shopper, within the window after their first "
        "(would-be) push, with a 95 %% confidence interval.",
    )
    report.add_argument(
        "--since",
        type=since,
        metavar="WHEN",
        help="only pushes decided since: an ISO date or time (UTC), or an age like 7d, 12h, 30m",
    )
    report.add_argument(
        "--window-s",
        type=positive,
        metavar="SECONDS",
        help="attribution window (default: PUSHREC_PUSH__ATTRIBUTION_WINDOW_S)",
    )
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=run)


def since(text: str) -> float:
    """Unix time of an ISO date/time (UTC unless it says otherwise) or of an age ago (7d)."""
    ago = _AGO.match(text)
    if ago:
        return time.time() - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time or an age like 7d: {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def run(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    import orjson
    from tqdm import tqdm

    from online_models.push_report import DISMISS, ENGAGING, OPEN, push_report
    from stream.events import BadEvent, decode_event
    from stream.exposures import read_topics

    kafka, names = kafka_with_topics(settings)
    exposures = [orjson.loads(value) for _, value in read_topics(kafka, [names.pushes])]
    log = logging.getLogger("pushrec.push_report")
    log.info("%d exposure records in %s; reading the events", len(exposures), names.pushes)

    def events() -> Any:
        records = read_topics(kafka, [names.events(kind) for kind in (*ENGAGING, OPEN, DISMISS)])
        for _, value in tqdm(records, desc="events read", unit=" events", mininterval=1.0):
            try:
                yield decode_event(value, settings.events.limits)
            except BadEvent:  # the worker dead-letters it; it is no engagement
                continue

    window = args.window_s or settings.push.attribution_window_s
    report = push_report(exposures, events(), window, args.since)
    emit(args, report, render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    """The report as text: totals, the uplift and what it allows to say, then per trigger."""
    hours = report["window_s"] / 3600
    decisions = ", ".join(f"{k} {v:,}" for k, v in sorted(report["decisions"].items())) or "none"
    lines = [
        f"push decisions: {decisions} (policy {', '.join(report['policy_versions']) or '-'})",
        f"sent {report['sent']:,}, opened {report['opens']:,} (open rate {report['open_rate']:.1%}), "
        f"dismissed {report['dismissals']:,}, converted {report['conversions']:,} "
        f"({report['conversions_per_1000']:.1f} per 1,000 pushes, within {hours:g} h)",
        f"holdout: {report['holdout_pushes']:,} would-be pushes, "
        f"{report['holdout_conversions_per_1000']:.1f} would-be conversions per 1,000",
        *_uplift_lines(report["holdout"], hours),
    ]
    for name, title in (("by_trigger", "trigger"), ("by_segment", "segment")):
        if not report[name]:
            continue
        lines.append(f"by {title}:")
        for value, part in report[name].items():
            held = part["holdout"]
            lines.append(
                f"  {value}: sent {part['sent']:,}, open rate {part['open_rate']:.1%}, "
                f"{part['conversions_per_1000']:.1f} conversions per 1,000 (holdout "
                f"{part['holdout_conversions_per_1000']:.1f}); engaged {100 * held['uplift']:+.1f} points "
                f"[{100 * held['ci95'][0]:+.1f}, {100 * held['ci95'][1]:+.1f}]"
                + (" (too few shoppers)" if held["too_small"] else "")
            )
    return "\n".join(lines)


def _uplift_lines(held: dict[str, Any], hours: float) -> list[str]:
    low, high = held["ci95"]
    lines = [
        f"shoppers who engaged within {hours:g} h of their first push: treated "
        f"{held['treated_engaged_share']:.1%} of {held['treated_users']:,}, holdout "
        f"{held['holdout_engaged_share']:.1%} of {held['holdout_users']:,}: uplift "
        f"{100 * held['uplift']:+.1f} points (95 % CI {100 * low:+.1f} to {100 * high:+.1f})",
        f"purchases per shopper: treated {held['treated_purchases_per_user']:.3f}, holdout "
        f"{held['holdout_purchases_per_user']:.3f}: {held['purchases_uplift']:+.3f} (95 % CI "
        f"{held['purchases_ci95'][0]:+.3f} to {held['purchases_ci95'][1]:+.3f})",
    ]
    if held["too_small"]:
        lines.append(
            "=> the groups are too small to conclude anything (each needs 30 shoppers and 5 who "
            "engaged and 5 who did not)"
        )
    elif held["conclusive"]:
        lines.append(f"=> pushes {'raise' if low > 0 else 'lower'} engagement (the interval excludes 0)")
    else:
        lines.append("=> no difference shown: the interval includes 0")
    return lines
