"""`pushrec bench`: the real pipeline's rate and latency against Faust's own ceiling, in one run
(with ``--items-file``, with the shop's catalogue taken in first); with ``--items N``, top-N over
a large catalogue (HNSW index against exact search)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from infra.latency import slowest_split
from infra.settings import Settings
from pushrec.commands._shared import (
    CommandError,
    Subcommands,
    UsageError,
    emit,
    existing_file,
    positive,
    positive_int,
)

log = logging.getLogger("pushrec")


def add_parser(sub: Subcommands) -> None:
    bench = sub.add_parser(
        "bench",
        help="throughput and latency of the real pipeline against Faust's own ceiling, in one run",
        description="Measures, on the embedded stack (or the configured servers): a trivial Faust agent's "
        "rate, the worker's rate on a backlog of the same events, event-to-list latency at --fraction of "
        "that rate, the worker's peak memory and evaluate's speed.",
    )
    bench.add_argument(
        "--events",
        type=existing_file,
        metavar="EVENTS",
        help="log to use (default: ../shared/datasets/taobao if present, else the bundled sample scaled up)",
    )
    bench.add_argument("--events-max", type=positive_int, default=50_000, metavar="N", help="events used")
    bench.add_argument(
        "--fraction", type=positive, default=0.5, help="the headline latency is at this share of the rate"
    )
    bench.add_argument(
        "--loads",
        type=positive,
        nargs="+",
        default=(0.25, 0.5, 0.75, 0.9),
        metavar="F",
        help="latency is also measured at these shares of the rate (default: %(default)s)",
    )
    bench.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        metavar="N",
        help="measure ceiling and pipeline as N alternating pairs; report the median ratio (default: 3)",
    )
    bench.add_argument(
        "--memory-users",
        type=positive_int,
        nargs=2,
        default=(10_000, 50_000),
        metavar=("SMALL", "LARGE"),
        help="model sizes (users) between which bytes per user are measured (default: %(default)s)",
    )
    bench.add_argument(
        "--checkpoint-users",
        type=positive_int,
        nargs="+",
        default=(100_000, 1_000_000),
        metavar="N",
        help="model sizes (users, over --checkpoint-partitions) at which the longest checkpoint stall "
        "and a partition's restore time are measured (default: %(default)s)",
    )
    bench.add_argument(
        "--checkpoint-partitions", type=positive_int, default=6, metavar="P", help="(default: %(default)s)"
    )
    bench.add_argument(
        "--items-file",
        type=existing_file,
        metavar="ITEMS",
        help="a catalogue (JSON Lines, as for replay --items) every worker takes in before the events "
        "come; evaluate is given it too",
    )
    bench.add_argument(
        "--items",
        type=positive_int,
        metavar="N",
        help="instead: top-N over an N-item catalogue, HNSW index against exact search, and the "
        "live rate in process and in a real worker (needs [ann])",
    )
    bench.add_argument(
        "--users", type=positive_int, default=500, help="users sampled by --items (default: %(default)s)"
    )
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pushrec.bench import cpu_split, default_events, run_bench

    events = args.events or default_events()
    if args.items:
        if args.items_file:
            raise UsageError("--items N and --items-file are two different benchmarks: give one")
        return _run_catalogue(args, settings, events)
    small, large = args.memory_users
    if not small < large:
        raise UsageError("--memory-users: the first size must be smaller than the second")
    result = run_bench(
        settings,
        events,
        args.events_max,
        args.fraction,
        log.info,
        (small, large),
        args.repeat,
        tuple(args.checkpoint_users),
        args.checkpoint_partitions,
        tuple(args.loads),
        args.items_file,
    )
    catalogue = (
        f"; the catalogue's {result['catalogue_items']:,} items taken in first" if args.items_file else ""
    )
    lines = [
        f"pushrec bench: {result['events']:,} events ({result['users']:,} users, "
        f"{result['items']:,} items{catalogue})",
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
        *(
            f"  event-to-list at {load['fraction']:>4.0%} ({load['rate_events_per_s']:>6,.0f}/s)  "
            f"p50 {load['p50_s'] * 1000:>4.0f} ms   p99 {load['p99_s'] * 1000:>4.0f} ms   "
            f"p99.9 {load['p999_s'] * 1000:>5.0f} ms\n"
            f"    slowest 1 %: {slowest_split(load['slowest_s'])}\n"
            f"    {load['lists_per_event']:.2f} lists per event; {cpu_split(load['cpu'])}"
            for load in result["latency_by_load"]
        ),
        f"  evaluate (pushrec model)       {result['evaluate_events_per_s']:>10,.0f} events/s",
        f"  worker peak RSS                {result['worker_peak_rss_bytes'] / 2**20:>10,.0f} MiB",
        f"  model memory                   {result['bytes_per_user']:>10,} B/user "
        f"{result['bytes_per_item']:,} B/item; 1M users "
        f"~{result['model_bytes_1m_users_extrapolated'] / 2**30:.1f} GiB (extrapolated)",
        *(
            f"  checkpoint at {int(size):>9,} users  longest stall {c['longest_stall_s'] * 1000:>6,.0f} ms, "
            f"partition restore {c['partition_restore_s'] * 1000:,.0f} ms ({c['partitions']} partitions)"
            for size, c in result["checkpoints"].items()
        ),
    ]
    emit(args, result, "\n".join(lines))
    return 0


def _run_catalogue(args: argparse.Namespace, settings: Settings, events: Path) -> int:
    from online_models import ann
    from pushrec.bench import cpu_split
    from pushrec.bench_catalogue import run_catalogue_bench

    if not ann.available():
        raise CommandError("bench --items needs the [ann] extra: pip install 'pushrec[ann]'")
    result = run_catalogue_bench(
        settings, events, args.items, args.events_max, log.info, args.users, worker=True
    )
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
        f"  live: {result['live_events']:,} events at {result['live_events_per_s']:,.0f}/s in "
        f"micro-batches of {result['live_batch_max']} (a list per event: "
        f"{result['live_events_per_s_list_per_event']:,.0f}/s); "
        f"{result['reindex_batches']} re-index batches ({result['reindex_rows']:,} rows, "
        f"{result['reindex_s']} s in the background)"
    )
    worker = result["worker"]
    lines.append(
        f"  in the worker (restarted on the grown items, index built in {worker['restore_and_index_s']} s): "
        f"{worker['events']:,} events from Kafka at {worker['events_per_s']:,.0f}/s; "
        f"{cpu_split(worker['cpu'])}"
    )
    emit(args, result, "\n".join(lines))
    return 0
