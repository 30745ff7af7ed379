"""The `pushrec` command line: one subcommand per job, one-line errors, exit 2 on usage errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from redis.exceptions import RedisError

from infra.kafka import KafkaAccess
from infra.logs import setup_logging
from infra.settings import ConfigError, Settings, load_settings
from infra.stack import EmbeddedStack, StackError, require_servers, resolve_addresses
from infra.store import Keys, RedisTopNStore, connect
from stream.events import Reason
from stream.replay import Pacing, Replayer, ReplayError
from stream.topics import TopicError, TopicNames, ensure_topics

EXIT_FAILURE, EXIT_USAGE = 1, 2
log = logging.getLogger("pushrec")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


class UsageError(Exception):
    """A valid-looking command line that cannot work here; exit code 2."""


class CommandError(Exception):
    """A failure to report as one line with a non-zero exit code."""


# --- commands -------------------------------------------------------------------------------


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    stack = EmbeddedStack(settings.state_dir)
    if args.action == "up":
        state = stack.up(args.kafka_port, args.redis_port)
        names = TopicNames(settings.kafka.topic_prefix)
        ensure_topics(KafkaAccess(state.kafka_bootstrap), names.all, settings.kafka.partitions)
        _emit(
            args,
            {"kafka_bootstrap": state.kafka_bootstrap, "redis_url": state.redis_url},
            f"stack up: kafka={state.kafka_bootstrap} redis={state.redis_url} (state in {stack.state_dir})",
        )
    elif args.action == "down":
        stopped = stack.down()
        _emit(args, {"stopped": stopped}, "stack down" if stopped else "stack was not running")
    else:
        status = stack.status()
        text = (
            f"running: kafka={status['kafka_bootstrap']} redis={status['redis_url']}"
            if status["running"]
            else f"not running {_status_detail(status)}"
        )
        _emit(args, status, text)
        return 0 if status["running"] else 3
    return 0


def _status_detail(status: dict[str, object]) -> str:
    if "kafka_up" not in status:
        return "(no stack started: run `pushrec stack up`)"
    return f"(kafka up: {status['kafka_up']}, redis up: {status['redis_up']})"


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.ingest import Ingest

    kafka, redis_url = resolve_addresses(settings)
    require_servers(kafka, redis_url)
    Ingest(settings, kafka, redis_url, until_idle_s=args.until_idle).run(args.metrics_port)
    return 0


def cmd_push_sender(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.push_sender import PushSender, run_push_sender

    _, redis_url = resolve_addresses(settings)
    require_servers(None, redis_url)
    sender = PushSender(settings, redis_url, args.outbox, until_idle_s=args.until_idle, segment=args.segment)
    run_push_sender(sender, args.metrics_port)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    kafka, _ = resolve_addresses(settings)
    require_servers(kafka, None)
    names = TopicNames(settings.kafka.topic_prefix)
    ensure_topics(kafka, names.all, settings.kafka.partitions, settings.kafka.replication_factor)
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
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from stream.dlq import list_dead_letters, redrive

    kafka, _ = resolve_addresses(settings)
    require_servers(kafka, None)
    names = TopicNames(settings.kafka.topic_prefix)
    ensure_topics(kafka, names.all, settings.kafka.partitions, settings.kafka.replication_factor)
    if args.action == "list":
        report = list_dead_letters(kafka, names.dead_letter, args.limit)
        head = f"{report.total} dead letters in {names.dead_letter}"
    else:
        group = f"{settings.kafka.consumer_group}-dlq-redrive"
        report = redrive(
            kafka, names.dead_letter, group, args.reason or (), args.from_beginning, args.dry_run
        )
        head = f"{'would re-drive' if args.dry_run else 're-drove'} {report.total} dead letters"
    lines = [head] + [f"  {reason}: {n}" for reason, n in report.by_reason.most_common()]
    for letter in report.letters[: args.limit]:
        src = letter["source"]
        lines.append(
            f"  [{letter['reason']}] {src['topic']}:{src['partition']}@{src['offset']} "
            f"{letter['detail']!r} raw={letter['raw'][:60]!r}"
        )
    _emit(args, report.to_dict(), "\n".join(lines))
    return 0


def cmd_recs(args: argparse.Namespace, settings: Settings) -> int:
    _, redis_url = resolve_addresses(settings)
    require_servers(None, redis_url)

    async def read() -> dict[str, object] | None:
        client = connect(redis_url, retries=1)
        try:
            stored = await RedisTopNStore(client, Keys(settings.redis.key_prefix)).read(args.user_id)
        finally:
            await client.aclose()
        return stored.to_dict() if stored else None

    stored = asyncio.run(read())
    if stored is None:
        raise CommandError(f"no list stored for user {args.user_id!r}")
    text = [f"user {args.user_id}: version {stored['version']}, model {stored['model']}"]
    tags: list[str] = stored["tags"]  # type: ignore[assignment]
    items: list[dict[str, Any]] = stored["items"]  # type: ignore[assignment]
    if tags:
        text.append(f"  interest segment: {', '.join(tags)}")
    text += [
        f"  {n:2d}. {i['item_id']}  {i['score']:.4f}" + (f"  ({i['reason']})" if i.get("reason") else "")
        for n, i in enumerate(items, 1)
    ]
    _emit(args, stored, "\n".join(text))
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from pushrec.bench import default_events, run_bench

    events = args.events or default_events()
    if args.items:
        return _bench_catalogue(args, settings, events)
    small, large = args.memory_users
    if not small < large:
        raise UsageError("--memory-users: the first size must be smaller than the second")
    result = run_bench(
        settings, events, args.events_max, args.fraction, log.info, (small, large), args.repeat
    )
    lines = [
        f"pushrec bench: {result['events']:,} events ({result['users']:,} users, {result['items']:,} items)",
        f"  ceiling (trivial Faust agent)  {result['ceiling_events_per_s']:>10,.0f} events/s",
        f"  pipeline (worker, backlog)     {result['pipeline_events_per_s']:>10,.0f} events/s"
        f"   ratio {result['ratio']:.2f}"
        + (
            f" (median of {len(result['pairs'])} pairs: "
            + ", ".join(f"{p['ratio']:.2f}" for p in result["pairs"])
            + ")"
            if len(result["pairs"]) > 1
            else ""
        ),
        f"  event-to-list at {result['latency_rate_events_per_s']:,.0f}/s   "
        f"p50 {result['latency_p50_s'] * 1000:.0f} ms   p99 {result['latency_p99_s'] * 1000:.0f} ms",
        f"  evaluate (pushrec model)       {result['evaluate_events_per_s']:>10,.0f} events/s",
        f"  worker peak RSS                {result['worker_peak_rss_bytes'] / 2**20:>10,.0f} MiB",
        f"  model memory                   {result['bytes_per_user']:>10,} B/user "
        f"{result['bytes_per_item']:,} B/item; 1M users "
        f"~{result['model_bytes_1m_users_extrapolated'] / 2**30:.1f} GiB (extrapolated)",
    ]
    _emit(args, result, "\n".join(lines))
    return 0


def _bench_catalogue(args: argparse.Namespace, settings: Settings, events: Path) -> int:
    from online_models import ann
    from pushrec.bench_catalogue import run_catalogue_bench

    if not ann.available():
        raise CommandError("bench --items needs the [ann] extra: pip install 'pushrec[ann]'")
    result = run_catalogue_bench(settings, events, args.items, args.events_max, log.info, args.users)
    n = result["n"]
    lines = [
        f"pushrec bench --items: {result['items']:,} items, top-{n} for {result['users_sampled']} users",
        f"  HNSW index built in {result['index_build_s']} s",
    ]
    for title, part in (
        ("fresh index", result["fresh_index"]),
        ("after live updates", result["after_live_updates"]),
    ):
        lines.append(
            f"  {title:<19} exact {part['exact_ms_per_user']:>7.2f} ms  approximate "
            f"{part['approx_ms_per_user']:>6.3f} ms per user (x{part['speedup']})  "
            f"recall@{n} {part[f'recall_at_{n}']}; index alone {part['index_search_ms']:.3f} ms, "
            f"recall@{n} {part[f'index_recall_at_{n}']}"
        )
    lines.append(
        f"  live: {result['live_events']:,} events at {result['live_events_per_s']:,.0f}/s, "
        "a list per event; "
        f"{result['reindex_batches']} re-index batches ({result['reindex_rows']:,} rows) took "
        f"{result['reindex_share_of_live_time']:.0%} of the time"
    )
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.forget import forget_user

    _, redis_url = resolve_addresses(settings)
    require_servers(None, redis_url)
    report = asyncio.run(forget_user(settings, redis_url, args.user_id, args.wait))
    model = report["model"]
    text = [
        f"forgot user {args.user_id}:",
        f"  redis keys deleted: {report['redis_keys']} (list, push history)",
        f"  refresh-stream entries deleted: {report['refresh_stream_entries']}",
        f"  model ({model['applied_by']}): "
        + ", ".join(f"{k}={v}" for k, v in model.items() if k != "applied_by"),
    ]
    _emit(args, report, "\n".join(text))
    return 0


BASELINES = ("popularity", "recent", "funkmf")
NO_CONTENT = "pushrec-no-content"  # the product model told nothing of the catalogue (with --items)
MODELS = ("pushrec", *BASELINES, "als")


def _make_model(name: str, settings: Settings, als_every: int):  # type: ignore[no-untyped-def]
    from consumers.worker import build_recommender
    from online_models.baselines import ALSRanker, FunkMFRanker, PopularityRanker, RecentRanker

    model = settings.model
    return {
        "pushrec": lambda: build_recommender(settings),
        NO_CONTENT: lambda: build_recommender(
            settings.model_copy(update={"model": model.model_copy(update={"content_encoder": "off"})})
        ),
        "popularity": lambda: PopularityRanker(model.popularity_half_life_s),
        "recent": RecentRanker,
        "funkmf": lambda: FunkMFRanker(seed=model.seed),
        "als": lambda: ALSRanker(every=als_every, seed=model.seed),
    }[name]()


def _als_available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from online_models.evaluation import evaluate
    from stream.events import BadEvent, decode_event
    from stream.replay import read_lines

    def events(path: Path):  # type: ignore[no-untyped-def]
        for number, line in read_lines(path):
            try:
                yield decode_event(line, settings.events.limits)
            except BadEvent as bad:
                log.warning("%s line %d skipped: %s", path, number, bad)

    names = list(dict.fromkeys([*(args.model or ["pushrec"]), *BASELINES]))
    if "als" not in names and _als_available():
        names.append("als")
    elif "als" in names and not _als_available():
        raise UsageError("--model als needs the implicit library: pip install 'pushrec[eval]'")
    if "als" not in names:
        log.warning("als baseline skipped: the implicit library is not installed (pushrec[eval])")
    if args.items and len(args.items) != len(args.events):
        raise UsageError(f"--items: give one ITEMS file per EVENTS file ({len(args.events)})")
    if args.items and "pushrec" in names and settings.model.content_encoder != "off":
        names.insert(names.index("pushrec") + 1, NO_CONTENT)
    texts: list[str] = []
    for number, path in enumerate(args.events):
        models = {name: _make_model(name, settings, args.als_every) for name in names}
        if args.items:
            announced = _announce_items(args.items[number], models.values(), settings)
            log.info(
                "catalogue: %d items from %s (%s encoder)",
                announced,
                args.items[number],
                settings.model.content_encoder,
            )
        dataset = path.parent.name if path.name.startswith("events.") else path.name.split(".")[0]
        with tqdm(  # counts events x models: each model replays the whole log in turn
            desc=f"evaluate {dataset} ({len(models)} models)",
            unit=" ev",
            disable=not sys.stderr.isatty(),
            file=sys.stderr,
        ) as bar:
            report = evaluate(events(path), models, k=args.k, dataset=dataset, progress=bar.update)
        log.info("evaluated %s: %d events, %d targets", dataset, report.events, report.targets)
        if args.json:
            print(json.dumps(report.to_dict()), flush=True)
        else:
            texts.append(_markdown(report) if args.markdown else _table(report))
    if texts:
        print("\n\n".join(texts))
    return 0


def _announce_items(path: Path, models: Iterable[object], settings: Settings) -> int:
    """Tell every model that takes a catalogue (the product model) about the items in ``path``."""
    from stream.events import BadEvent, decode_item
    from stream.replay import read_lines

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


_COLUMNS = ("hr", "ndcg", "precision", "recall", "f1", "coverage", "new_item_hr", "cold_item_hr")
_HEADINGS = ("HR", "NDCG", "P", "R", "F1", "coverage", "new-HR", "cold-HR", "ev/s")


def _table(report) -> str:  # type: ignore[no-untyped-def]
    header = f"{'model':<20}" + "".join(f"{c:>11}" for c in _HEADINGS)
    rows = [
        f"{name:<20}" + "".join(f"{m[c]:>11.4f}" for c in _COLUMNS) + f"{m['events_per_s']:>11.0f}"
        for name, m in report.models.items()
    ]
    title = f"{report.dataset}: {report.events} events, {report.targets} targets, @K={report.k}"
    return "\n".join([title, header, *rows])


def _markdown(report) -> str:  # type: ignore[no-untyped-def]
    lines = [
        f"**{report.dataset}** ({report.events:,} events, {report.targets:,} targets, K={report.k})",
        "",
        "| model | " + " | ".join(_HEADINGS) + " |",
        "|---" * (len(_HEADINGS) + 1) + "|",
    ]
    for name, m in report.models.items():
        cells = [f"{m[c]:.4f}" for c in _COLUMNS] + [f"{m['events_per_s']:,.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pushrec.demo import run_demo

    return run_demo(settings, users_to_show=args.users)


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pushrec",
        description="Streaming, real-time recommendations for push notifications.",
        epilog="Configuration comes from PUSHREC_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    stack = sub.add_parser("stack", help="start/stop/inspect the embedded Kafka broker and Valkey")
    stack_sub = stack.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    up = stack_sub.add_parser("up", help="start both servers in the background")
    up.add_argument("--kafka-port", type=_port, help="broker port (default: a free one)")
    up.add_argument("--redis-port", type=_port, help="Valkey port (default: a free one)")
    up.add_argument("--json", action="store_true", help="print the addresses as JSON")
    down = stack_sub.add_parser("down", help="stop both servers")
    down.add_argument("--json", action="store_true")
    status = stack_sub.add_parser("status", help="are they up? (exit 3 if not)")
    status.add_argument("--json", action="store_true")

    worker = sub.add_parser("worker", help="run the Faust worker: ingest, learn, refresh top-N")
    worker.add_argument("--metrics-port", type=_port, help="serve Prometheus /metrics on this port")
    worker.add_argument(
        "--until-idle",
        type=_positive,
        metavar="SECONDS",
        help="exit 0 after this long with no new events (batch replays, tests)",
    )

    sender = sub.add_parser("push-sender", help="turn refreshed lists into push notifications")
    sender.add_argument(
        "--outbox",
        type=Path,
        default=Path("outbox.jsonl"),
        help="JSON Lines file the notifications are appended to (default: %(default)s)",
    )
    sender.add_argument("--metrics-port", type=_port, help="serve Prometheus /metrics on this port")
    sender.add_argument(
        "--segment",
        metavar="TAG",
        help="a campaign: push only to users whose interest segment carries this tag (see recs --json)",
    )
    sender.add_argument(
        "--until-idle",
        type=_positive,
        metavar="SECONDS",
        help="exit 0 after this long with no refreshed lists",
    )

    replay = sub.add_parser("replay", help="produce a recorded event log to the topics")
    replay.add_argument("events", type=_existing_file, metavar="EVENTS", help="JSON Lines, may be .gz")
    replay.add_argument(
        "--items", type=_existing_file, metavar="ITEMS", help="item catalogue to produce first"
    )
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=_positive, metavar="X", help="replay at X times event time")
    pace.add_argument("--rate", type=_positive, metavar="N", help="N events per second")
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")

    recs = sub.add_parser("recs", help="show a user's current top-N from Redis")
    recs.add_argument("user_id", metavar="USER_ID")
    recs.add_argument("--json", action="store_true")

    evaluate = sub.add_parser(
        "evaluate", help="prequential (test-then-train) evaluation on a log, in process"
    )
    evaluate.add_argument(
        "events", type=_existing_file, nargs="+", metavar="EVENTS", help="JSON Lines, may be .gz; one or more"
    )
    evaluate.add_argument(
        "--items",
        type=_existing_file,
        nargs="+",
        metavar="ITEMS",
        help="catalogue (title, category) per EVENTS file, in the same order: the product model "
        "embeds it and can rank items before their first event; adds the row pushrec-no-content",
    )
    evaluate.add_argument(
        "--k", type=_positive_int, default=10, help="list length scored (default: %(default)s)"
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
        type=_positive_int,
        default=5_000,
        metavar="N",
        help="the als baseline refits from scratch every N events (default: %(default)s)",
    )
    output = evaluate.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON report per line (per EVENTS file)")
    output.add_argument("--markdown", action="store_true", help="Markdown tables (for docs)")

    bench = sub.add_parser(
        "bench",
        help="throughput and latency of the real pipeline against Faust's own ceiling, in one run",
        description="Measures, on the embedded stack (or the configured servers): a trivial Faust agent's "
        "rate, the worker's rate on a backlog of the same events, event-to-list latency at --fraction of "
        "that rate, the worker's peak memory and evaluate's speed.",
    )
    bench.add_argument(
        "--events",
        type=_existing_file,
        metavar="EVENTS",
        help="log to use (default: ../shared/datasets/taobao if present, else the bundled sample scaled up)",
    )
    bench.add_argument("--events-max", type=_positive_int, default=50_000, metavar="N", help="events used")
    bench.add_argument(
        "--fraction", type=_positive, default=0.5, help="latency is measured at this share of the rate"
    )
    bench.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        metavar="N",
        help="measure ceiling and pipeline as N alternating pairs; report the median ratio (default: 3)",
    )
    bench.add_argument(
        "--memory-users",
        type=_positive_int,
        nargs=2,
        default=(10_000, 50_000),
        metavar=("SMALL", "LARGE"),
        help="model sizes (users) between which bytes per user are measured (default: %(default)s)",
    )
    bench.add_argument(
        "--items",
        type=_positive_int,
        metavar="N",
        help="instead: top-N over an N-item catalogue, HNSW index against exact search (needs [ann])",
    )
    bench.add_argument(
        "--users", type=_positive_int, default=500, help="users sampled by --items (default: %(default)s)"
    )
    bench.add_argument("--json", action="store_true")

    dlq = sub.add_parser(
        "dlq",
        help="list dead letters by reason, or re-drive them to their source topics after a fix",
        description="list: counts by reason and the first --limit letters. redrive: produce the raw "
        "bytes of each letter (optionally only --reason R) back to the topic it came from; remembers "
        "how far it got, so a second run sends only newer letters.",
    )
    dlq.add_argument("action", choices=("list", "redrive"))
    dlq.add_argument("--reason", action="append", choices=[r.value for r in Reason], metavar="REASON")
    dlq.add_argument("--limit", type=_positive_int, default=20, help="letters shown in detail")
    dlq.add_argument("--from-beginning", action="store_true", help="redrive: start over")
    dlq.add_argument("--dry-run", action="store_true", help="redrive: only report what would be sent")
    dlq.add_argument("--json", action="store_true")

    forget = sub.add_parser(
        "forget",
        help="erase a user from model factors, lists, push history and dedupe state",
        description="Erase USER_ID from Redis (list, push history, refresh stream) and from the model: "
        "a running worker applies the request and checkpoints; otherwise the stored checkpoint is "
        "edited and the request waits for the worker.",
    )
    forget.add_argument("user_id", metavar="USER_ID")
    forget.add_argument(
        "--wait",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a running worker to apply it (default: %(default)s)",
    )
    forget.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="run everything on a bundled sample, then clean up")
    demo.add_argument("--users", type=int, default=3, help="how many users' lists to print")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "stack": cmd_stack,
    "worker": cmd_worker,
    "push-sender": cmd_push_sender,
    "replay": cmd_replay,
    "recs": cmd_recs,
    "evaluate": cmd_evaluate,
    "forget": cmd_forget,
    "dlq": cmd_dlq,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"pushrec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings)
    try:
        return COMMANDS[args.command](args, settings)
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
