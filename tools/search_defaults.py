"""The documented search behind pushrec's model defaults (see docs/quality.md).

Coordinate search over the shared datasets as a whole: start from a base point (today's
defaults); for each parameter in turn try every listed value with the others held, keep the
value with the best objective, move on. Objective = the *worst* (dataset, protocol) pair's
HR@10(pushrec) / HR@10(best of popularity, recent, funkmf and repeat) under both protocols
(next-event and next-session): one set of defaults that must hold everywhere, not a per-dataset
tune. Baselines are scored once per dataset and protocol.

    python tools/search_defaults.py \
        ../shared/datasets/{taobao,online-retail,movielens-small,completejourney}/events.jsonl.gz

Prints one line per trial and the chosen point; with --jobs 2 runs datasets in parallel.
(Until 2026-12-01 the search ran the SPEC protocol only, against popularity, recent and funkmf,
over factors, learning rate, negatives and the blend weights: docs/quality.md.)
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

from infra.settings import ModelSettings  # noqa: E402
from online_models.baselines import FunkMFRanker, PopularityRanker, RecentRanker, RepeatRanker  # noqa: E402
from online_models.evaluation import evaluate, evaluate_visits  # noqa: E402
from online_models.recommender import Recommender  # noqa: E402
from stream.events import decode_event  # noqa: E402
from stream.replay import read_lines  # noqa: E402

BASE = ModelSettings().model_dump(exclude={"hit_rate_window"})
SPACE = {
    "covisit_weight": [0.0, 2.0, 5.0, 10.0, 20.0],
    "covisit_window": [3, 5, 10],
    "rebuy_weight": [0.0, 20.0, 50.0, 100.0, 200.0],
    "rebuy_min_share": [0.05, 0.1, 0.2, 0.3],
    "popularity_weight": [1.0, 2.0, 4.0],
    "recent_weight": [10.0, 100.0, 300.0],
}
PROTOCOLS = ("next-event", "next-session")
SWEEPS = 1
_events: dict[str, list] = {}


def _load(path: str) -> list:
    if path not in _events:
        _events[path] = [decode_event(line) for _, line in read_lines(Path(path))]
    return _events[path]


def _hr(path: str, params: dict | None) -> dict[str, dict[str, float]]:
    """HR@10 per protocol of pushrec at ``params``, or of every baseline when ``params`` is None."""
    out = {}
    for protocol in PROTOCOLS:
        if params is None:
            models = {
                "popularity": PopularityRanker(),
                "recent": RecentRanker(),
                "funkmf": FunkMFRanker(),
                "repeat": RepeatRanker(),
            }
        else:
            models = {"pushrec": Recommender(**params)}
        run = evaluate if protocol == "next-event" else evaluate_visits
        report = run(_load(path), models, k=10)
        out[protocol] = {name: m["hr"] for name, m in report.models.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="+")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs) as pool:
        baselines = dict(zip(args.events, pool.map(_hr, args.events, [None] * len(args.events)), strict=True))
        best = {(p, proto): max(b[proto].values()) for p, b in baselines.items() for proto in PROTOCOLS}
        for path, hrs in baselines.items():
            print(f"baselines {Path(path).parent.name}: {json.dumps(hrs)}", flush=True)
        cache: dict[str, float] = {}

        def objective(params: dict) -> float:
            key = json.dumps(params, sort_keys=True)
            if key not in cache:
                hrs = list(pool.map(_hr, args.events, [params] * len(args.events)))
                ratios = {
                    (path, proto): h[proto]["pushrec"] / best[(path, proto)]
                    for path, h in zip(args.events, hrs, strict=True)
                    for proto in PROTOCOLS
                }
                cache[key] = min(ratios.values())
                shown = " ".join(f"{Path(p).parent.name}/{pr[5:]}={r:.3f}" for (p, pr), r in ratios.items())
                changed = {k: v for k, v in params.items() if BASE.get(k) != v}
                print(f"{cache[key]:.4f}  {json.dumps(changed)}  {shown}", flush=True)
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
