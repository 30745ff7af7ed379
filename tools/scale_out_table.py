"""The price of scaling out, offline (docs/quality.md, "Many workers"): the product model as one
worker against N workers (users split by Kafka's partitioner, item state merged every S seconds
of event time, ``online_models.item_sync``), on each log, for several merge intervals and seeds.

    python tools/scale_out_table.py ../shared/datasets/*/events.jsonl.gz --workers 4 --jobs 2
    python tools/scale_out_table.py ... --items     # each log's catalogue (items.jsonl.gz beside it)

Prints one JSON line per run, then Markdown tables (HR@10 and NDCG@10, and the ratio to one
worker). Same models and defaults as `pushrec evaluate --workers N --sync-s S`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.worker import build_recommender  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from online_models.evaluation import evaluate  # noqa: E402
from online_models.item_sync import ShardedRecommender  # noqa: E402
from pushrec.commands.evaluate import announce_items  # noqa: E402
from stream.events import decode_event  # noqa: E402
from stream.replay import read_lines  # noqa: E402
from stream.topics import partition_of  # noqa: E402

SYNCS: list[float | None] = [0.1, 1.0, 10.0, 60.0, None]


def run(path: str, workers: int, sync_s: float | None, seed: int, items: bool) -> dict[str, object]:
    settings = load_settings(model={"seed": seed})
    events = [decode_event(line, settings.events.limits) for _, line in read_lines(Path(path))]
    shards = [build_recommender(settings) for _ in range(workers)]
    sharded = ShardedRecommender(shards, lambda user: partition_of(user, workers), sync_s)
    models = {"one": build_recommender(settings), "sharded": sharded}
    if items:
        announce_items(Path(path).parent / "items.jsonl.gz", models.values(), settings)
    report = evaluate(events, models, k=10)
    one, many = report.models["one"], report.models["sharded"]
    return {
        "dataset": Path(path).parent.name,
        "workers": workers,
        "sync_s": sync_s,
        "seed": seed,
        "hr_one": one["hr"],
        "ndcg_one": one["ndcg"],
        "hr": many["hr"],
        "ndcg": many["ndcg"],
        "cold_item_hr_one": one["cold_item_hr"],
        "cold_item_hr": many["cold_item_hr"],
        "merges": sharded.merges,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="+")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="seeds at S = 1 s")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--items", action="store_true", help="announce items.jsonl.gz beside each log first")
    parser.add_argument(
        "--syncs", type=float, nargs="+", help="merge intervals (s) instead of 0.1 1 10 60 and never"
    )
    args = parser.parse_args()
    syncs = args.syncs or SYNCS
    runs = [(p, args.workers, s, 42, args.items) for p in args.events for s in syncs]
    seeds = [seed for seed in args.seeds if seed != 42]
    runs += [(p, args.workers, 1.0, seed, args.items) for p in args.events for seed in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, *zip(*runs, strict=True)))
    for result in results:
        print(json.dumps(result), flush=True)
    names = list(dict.fromkeys(str(r["dataset"]) for r in results))
    print("\n| merge interval | " + " | ".join(f"{n} HR (ratio)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for sync in syncs:
        cells = []
        for name in names:
            (r,) = [r for r in results if r["dataset"] == name and r["sync_s"] == sync and r["seed"] == 42]
            cells.append(f"{r['hr']:.4f} ({r['hr'] / r['hr_one']:.2f})")
        label = "never" if sync is None else f"{sync:g} s"
        print(f"| {label} | " + " | ".join(cells) + " |")
    if 1.0 not in syncs:
        return
    print("\nAt 1 s, mean over seeds " + ", ".join(map(str, sorted(set(args.seeds)))) + ":\n")
    print("| log | HR one worker | HR N workers | ratio | NDCG one | NDCG N | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        at1 = [r for r in results if r["dataset"] == name and r["sync_s"] == 1.0]
        hr1, hrn = (statistics.mean(float(r[k]) for r in at1) for k in ("hr_one", "hr"))
        nd1, ndn = (statistics.mean(float(r[k]) for r in at1) for k in ("ndcg_one", "ndcg"))
        print(
            f"| {name} | {hr1:.4f} | {hrn:.4f} | {hrn / hr1:.3f} | {nd1:.4f} | {ndn:.4f} | {ndn / nd1:.3f} |"
        )


if __name__ == "__main__":
    main()
