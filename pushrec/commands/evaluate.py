"""`pushrec evaluate`: prequential (test-then-train) evaluation of the models on logs, in process."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from infra.settings import Settings
from online_models.evaluation import Report, evaluate, evaluate_visits
from pushrec.commands._shared import Subcommands, UsageError, existing_file, positive, positive_int
from stream.events import BadEvent, Event, decode_event, decode_item
from stream.replay import read_lines

log = logging.getLogger("pushrec")

BASELINES = ("popularity", "recent", "funkmf", "sr", "repeat")
NO_CONTENT = "pushrec-no-content"  # the product model told nothing of the catalogue (with --items)
MODELS = ("pushrec", *BASELINES, "als")
_COLUMNS = ("hr", "ndcg", "precision", "recall", "f1", "coverage", "new_item_hr", "cold_item_hr")
_HEADINGS = ("HR", "NDCG", "P", "R", "F1", "coverage", "new-HR", "cold-HR", "ev/s")


def add_parser(sub: Subcommands) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="prequential (test-then-train) evaluation on a log, in process"
    )
    evaluate.add_argument(
        "events", type=existing_file, nargs="+", metavar="EVENTS", help="JSON Lines, may be .gz; one or more"
    )
    evaluate.add_argument(
        "--items",
        type=existing_file,
        nargs="+",
        metavar="ITEMS",
        help="catalogue (title, category) per EVENTS file, in the same order: the product model "
        "embeds it and can rank items before their first event; adds the row pushrec-no-content",
    )
    evaluate.add_argument(
        "--k", type=positive_int, default=10, help="list length scored (default: %(default)s)"
    )
    evaluate.add_argument(
        "--model",
        action="append",
        choices=MODELS,
        metavar="NAME",
        help=f"model(s) to evaluate, one of {', '.join(MODELS)}; baselines are always included",
    )
    evaluate.add_argument(
        "--als-every",
        type=positive_int,
        default=5_000,
        metavar="N",
        help="the als baseline refits from scratch every N events (default: %(default)s)",
    )
    evaluate.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="also evaluate the product model as N workers: users split by Kafka's partitioner, item "
        "state merged every --sync-s seconds of event time (row pushrec-N-workers)",
    )
    evaluate.add_argument(
        "--sync-s",
        type=_sync_interval,
        default=1.0,
        metavar="S",
        help="with --workers: seconds of event time between item-state merges, or 'never' (default: 1)",
    )
    evaluate.add_argument(
        "--protocol",
        choices=("next-event", "next-session", "both"),
        default="next-event",
        help="next-event: each target event judged before it is learned (the SPEC protocol); "
        "next-session: the list at the start of each later visit judged against what the user "
        "engages with during it (the list a push would carry); both (default: %(default)s)",
    )
    evaluate.add_argument(
        "--gap",
        type=positive,
        default=30.0,
        metavar="MINUTES",
        help="next-session: a visit ends after this long without an event, or at a new session_id "
        "(default: %(default)s)",
    )
    evaluate.add_argument(
        "--push",
        action="store_true",
        help="replay through the product model and the push policy on the log's clock instead: push "
        "precision (item engaged with within 24 h of the send), pushes per shopper-day and reach, "
        "for the policy (PUSHREC_PUSH__*) and the naive one (top item at every refresh, same cap)",
    )
    output = evaluate.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON report per line (per EVENTS file)")
    output.add_argument("--markdown", action="store_true", help="Markdown tables (for docs)")
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    if args.items and len(args.items) != len(args.events):
        raise UsageError(f"--items: give one ITEMS file per EVENTS file ({len(args.events)})")
    if args.push:
        return _run_push(args, settings)

    names = list(dict.fromkeys([*(args.model or ["pushrec"]), *BASELINES]))
    if "als" not in names and _als_available():
        names.append("als")
    elif "als" in names and not _als_available():
        raise UsageError("--model als needs the implicit library: pip install 'pushrec[eval]'")
    if "als" not in names:
        log.warning("als baseline skipped: the implicit library is not installed (pushrec[eval])")
    if args.items and "pushrec" in names and settings.model.content_encoder != "off":
        names.insert(names.index("pushrec") + 1, NO_CONTENT)
    if args.workers and args.workers > 1:
        names.insert(
            names.index("pushrec") + 1 if "pushrec" in names else 0, f"pushrec-{args.workers}-workers"
        )
    protocols = ["next-event", "next-session"] if args.protocol == "both" else [args.protocol]
    texts: list[str] = []
    for number, path in enumerate(args.events):
        dataset = _dataset(path)
        for protocol in protocols:
            models = {name: _make_model(name, settings, args) for name in names}
            if args.items:
                announced = announce_items(args.items[number], models.values(), settings)
                log.info(
                    "catalogue: %d items from %s (%s encoder)",
                    announced,
                    args.items[number],
                    settings.model.content_encoder,
                )
            with tqdm(  # counts events x models: each model replays the whole log in turn
                desc=f"evaluate {dataset} {protocol} ({len(models)} models)",
                unit=" ev",
                disable=not sys.stderr.isatty(),
                file=sys.stderr,
            ) as bar:
                events = _events(path, settings)
                if protocol == "next-session":
                    report = evaluate_visits(
                        events, models, k=args.k, gap_s=60 * args.gap, dataset=dataset, progress=bar.update
                    )
                else:
                    report = evaluate(events, models, k=args.k, dataset=dataset, progress=bar.update)
            log.info(
                "evaluated %s (%s): %d events, %d targets", dataset, protocol, report.events, report.targets
            )
            if args.json:
                print(json.dumps(report.to_dict()), flush=True)
            else:
                texts.append(_markdown(report) if args.markdown else _table(report))
    if texts:
        print("\n\n".join(texts))
    return 0


def _run_push(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from consumers.push_sender import build_push_policy
    from consumers.worker import build_recommender
    from online_models.push_evaluation import evaluate_push

    if args.model or args.workers or args.protocol != "next-event":
        raise UsageError(
            "--push evaluates the product model and push policy: drop --model, --workers, --protocol"
        )
    policy = build_push_policy(settings)
    texts = []
    for number, path in enumerate(args.events):
        dataset = _dataset(path)
        model = build_recommender(settings)
        if args.items:
            announce_items(args.items[number], [model], settings)
        with tqdm(
            desc=f"evaluate --push {dataset}", unit=" ev", disable=not sys.stderr.isatty(), file=sys.stderr
        ) as bar:
            report = evaluate_push(
                _events(path, settings), model, policy, dataset=dataset, progress=bar.update
            )
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            texts.append(_push_table(report, args.markdown))
    if texts:
        print("\n\n".join(texts))
    return 0


def _push_table(report: dict[str, Any], markdown: bool) -> str:
    title = (
        f"{report['dataset']} (--push): {report['events']:,} events, {report['users']:,} shoppers, "
        f"{report['shopper_days']:,} shopper-days"
    )
    headings = ("policy", "trigger", "pushes", "judged", "precision", "pushes/shopper-day", "reach")
    rows = []
    for name, policy in report["policies"].items():
        rows.append(
            (
                name,
                "all",
                policy["pushes"],
                policy["judged"],
                f"{policy['precision']:.4f}",
                f"{policy['pushes_per_user_day']:.3f}",
                f"{policy['reach']:.3f}",
            )
        )
        for trigger, counts in policy["by_trigger"].items():
            rows.append(
                ("", trigger, counts["pushes"], counts["judged"], f"{counts['precision']:.4f}", "", "")
            )
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(headings) + " |", "|---" * len(headings) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = (9, 15, 8, 8, 10, 20, 7)
    lines = [title, "".join(f"{h:>{w}}" for h, w in zip(headings, widths, strict=True))]
    lines += ["".join(f"{c!s:>{w}}" for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _dataset(path: Path) -> str:
    return path.parent.name if path.name.startswith("events.") else path.name.split(".")[0]


def _events(path: Path, settings: Settings) -> Iterator[Event]:
    for number, line in read_lines(path):
        try:
            yield decode_event(line, settings.events.limits)
        except BadEvent as bad:
            log.warning("%s line %d skipped: %s", path, number, bad)


def _make_model(name: str, settings: Settings, args: argparse.Namespace) -> Any:
    from consumers.worker import build_recommender
    from online_models.baselines import (
        ALSRanker,
        FunkMFRanker,
        PopularityRanker,
        RecentRanker,
        RepeatRanker,
        SequentialRulesRanker,
    )
    from online_models.item_sync import ShardedRecommender
    from stream.topics import partition_of

    model = settings.model
    if name.endswith("-workers"):
        n = args.workers
        shards = [build_recommender(settings) for _ in range(n)]
        return ShardedRecommender(shards, lambda user: partition_of(user, n), args.sync_s)
    return {
        "pushrec": lambda: build_recommender(settings),
        NO_CONTENT: lambda: build_recommender(
            settings.model_copy(update={"model": model.model_copy(update={"content_encoder": "off"})})
        ),
        "popularity": lambda: PopularityRanker(model.popularity_half_life_s),
        "recent": RecentRanker,
        "funkmf": lambda: FunkMFRanker(seed=model.seed),
        "sr": SequentialRulesRanker,
        "repeat": RepeatRanker,
        "als": lambda: ALSRanker(every=args.als_every, seed=model.seed),
    }[name]()


def _sync_interval(text: str) -> float | None:
    if text == "never":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds or 'never': {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, or 'never', got {text}")
    return value


def _als_available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


def announce_items(path: Path, models: Iterable[object], settings: Settings) -> int:
    """Tell every model that takes a catalogue (the product model) about the items in ``path``."""
    items = []
    for number, line in read_lines(path):
        try:
            items.append(decode_item(line, settings.events.limits))
        except BadEvent as bad:
            log.warning("%s line %d skipped: %s", path, number, bad)
    ids, titles, categories = (
        [i.item_id for i in items],
        [i.title for i in items],
        [i.category for i in items],
    )
    for model in models:
        add_items = getattr(model, "add_items", None)
        if add_items is not None:
            add_items(ids, titles, categories)
    return len(items)


def _table(report: Report) -> str:
    header = f"{'model':<20}" + "".join(f"{c:>11}" for c in _HEADINGS)
    rows = [
        f"{name:<20}" + "".join(f"{m[c]:>11.4f}" for c in _COLUMNS) + f"{m['events_per_s']:>11.0f}"
        for name, m in report.models.items()
    ]
    judged = "visits" if report.protocol == "next-session" else "targets"
    title = (
        f"{report.dataset} ({report.protocol}): {report.events} events, {report.targets} {judged}, "
        f"@K={report.k}"
    )
    return "\n".join([title, header, *rows])


def _markdown(report: Report) -> str:
    lines = [
        f"**{report.dataset}**, {report.protocol} ({report.events:,} events, {report.targets:,} "
        f"{'visits' if report.protocol == 'next-session' else 'targets'}, K={report.k})",
        "",
        "| model | " + " | ".join(_HEADINGS) + " |",
        "|---" * (len(_HEADINGS) + 1) + "|",
    ]
    for name, m in report.models.items():
        cells = [f"{m[c]:.4f}" for c in _COLUMNS] + [f"{m['events_per_s']:,.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
