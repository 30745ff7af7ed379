"""The documented search behind pushrec's model defaults (see docs/quality.md).

Coordinate search over the shared datasets as a whole: start from a base point (the result of
an earlier, coarser exploration); for each parameter in turn try every listed value with the
others held, keep the value with the best objective, move on; sweep the list twice. Objective =
the *worst* dataset's HR@10(pushrec) / HR@10(best baseline on that dataset): one set of defaults
that must beat every baseline everywhere, not a per-dataset tune. Baselines (popularity, recent,
funkmf) are scored once per dataset.

    python tools/search_defaults.py ../shared/datasets/{taobao,online-retail,movielens-small}/events.jsonl.gz

Prints one line per trial and the chosen point; with --jobs 2 runs datasets in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.baselines import FunkMFRanker, PopularityRanker, RecentRanker  # noqa: E402
from online_models.evaluation import evaluate  # noqa: E402
from online_models.recommender import Recommender  # noqa: E402
from stream.events import decode_event  # noqa: E402
from stream.replay import read_lines  # noqa: E402

BASE = {
    "recent_weight": 100.0,
    "recent_half_life_s": 86_400.0,
    "learning_rate": 0.3,
    "n_factors": 32,
    "negatives": 1,
    "popular_negatives": 0.0,
    "popularity_weight": 2.0,
    "session_weight": 3.0,
    "session_items": 1,
}
SPACE = {
    "recent_weight": [0.0, 10.0, 100.0],
    "recent_half_life_s": [3_600.0, 86_400.0, 604_800.0],
    "learning_rate": [0.05, 0.1, 0.2, 0.3, 0.4],
    "n_factors": [16, 32, 64],
    "negatives": [1, 2, 4],
    "popular_negatives": [0.0, 0.5, 1.0],
    "popularity_weight": [0.0, 0.5, 1.0, 2.0, 4.0],
    "session_weight": [0.0, 1.0, 3.0, 6.0],
    "session_items": [1, 5, 20],
}
SWEEPS = 2
_events: dict[str, list] = {}


def _load(path: str) -> list:
    if path not in _events:
        _events[path] = [decode_event(line) for _, line in read_lines(Path(path))]
    return _events[path]


def _hr(path: str, params: dict | None) -> dict[str, float]:
    """HR@10 of pushrec at ``params``, or of every baseline when ``params`` is None."""
    if params is None:
        models = {"popularity": PopularityRanker(), "recent": RecentRanker(), "funkmf": FunkMFRanker()}
    else:
        models = {"pushrec": Recommender(**params)}
    report = evaluate(_load(path), models, k=10)
    return {name: m["hr"] for name, m in report.models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="+")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs) as pool:
        baselines = dict(zip(args.events, pool.map(_hr, args.events, [None] * len(args.events)), strict=True))
        best_baseline = {p: max(b.values()) for p, b in baselines.items()}
        for path, hrs in baselines.items():
            print(f"baselines {Path(path).parent.name}: {json.dumps(hrs)}", flush=True)
        cache: dict[str, float] = {}

        def objective(params: dict) -> float:
            key = json.dumps(params, sort_keys=True)
            if key not in cache:
                hrs = list(pool.map(_hr, args.events, [params] * len(args.events)))
                runs = list(zip(args.events, hrs, strict=True))
                ratios = [h["pushrec"] / best_baseline[p] for p, h in runs]
                cache[key] = min(ratios)
                shown = " ".join(f"{Path(p).parent.name}={h['pushrec']:.4f}" for p, h in runs)
                print(f"{cache[key]:.4f}  {key}  {shown}", flush=True)
            return cache[key]

        point = dict(BASE)
        for sweep in range(SWEEPS):
            for name, values in SPACE.items():
                scored = {value: objective({**point, name: value}) for value in values}
                point[name] = max(scored, key=lambda v: scored[v])
                print(f"-> sweep {sweep + 1}: {name} = {point[name]} ({scored[point[name]]:.4f})", flush=True)
    print("chosen:", json.dumps(point))


if __name__ == "__main__":
    main()
