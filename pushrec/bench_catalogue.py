"""`pushrec bench --items N`: top-N over a large catalogue, approximate (HNSW) against exact.

In process, no servers. The product model learns the first half of the events; the catalogue is
then grown to ``N`` items whose factors are drawn from a Gaussian fitted to the learned item
factors (the shops we have hold at most 55k items); then, for a sample of users:

1. exact: every item scored (`Recommender.recommend(exact=True)`), time per user;
2. approximate: the HNSW index (`online_models.ann`), time per user, recall@n against (1);
3. live: the second half of the events learned with a list refreshed per event, as the worker
   does, so the index lags and is re-indexed in batches; events/s, re-index time, and (1)/(2)
   again afterwards, so recall is also measured on an index that has been kept up to date.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from infra.settings import Settings
from online_models.recommender import Recommender
from online_models.topn import top_n
from pushrec.bench import load_lines
from stream.events import decode_event


def _sample_users(rec: Recommender, users: list[str], n: int, seed: int) -> list[str]:
    known = [u for u in users if rec.mf.user_vector(u) is not None]
    rng = np.random.default_rng(seed)
    return [known[i] for i in sorted(rng.choice(len(known), min(n, len(known)), replace=False))]


def _compare(rec: Recommender, users: list[str], n: int) -> dict[str, float]:
    """For each user: the product list exact and approximate (time, recall@n of the approximate
    list), and the index alone against exact inner-product search of the same query (recall@n;
    the graph's n nearest plus its pending rows, re-scored): the lists also hold exactly scored
    own and popular items, so the index alone is the stricter figure."""
    exact_s = approx_s = search_s = 0.0
    recalls, index_recalls = [], []
    rec.recommend(users[0], n)  # build or bring the index up to date outside the timing
    index = rec.approximate_index
    assert index is not None
    matrix = rec.mf.item_matrix()
    for user in users:
        t0 = time.perf_counter()
        truth = rec.recommend(user, n, exact=True).items
        t1 = time.perf_counter()
        approx = rec.recommend(user, n).items
        t2 = time.perf_counter()
        exact_s += t1 - t0
        approx_s += t2 - t1
        if truth:
            recalls.append(len(set(truth) & set(approx)) / len(truth))
        query = rec.user_query(user)
        assert query is not None
        best, _ = top_n(matrix @ query, n)
        t3 = time.perf_counter()
        found, pending = index.candidates(query, n)
        rows = np.union1d(found, pending)  # the graph's answer plus the rows it holds stale
        picked, _ = top_n(matrix[rows] @ query, n)
        search_s += time.perf_counter() - t3
        index_recalls.append(len(set(best.tolist()) & set(rows[picked].tolist())) / len(best))
    return {
        "exact_ms_per_user": round(1000 * exact_s / len(users), 3),
        "approx_ms_per_user": round(1000 * approx_s / len(users), 3),
        "speedup": round(exact_s / max(approx_s, 1e-12), 1),
        f"recall_at_{n}": round(float(np.mean(recalls)), 4),
        "index_search_ms": round(1000 * search_s / len(users), 3),
        f"index_recall_at_{n}": round(float(np.mean(index_recalls)), 4),
    }


def run_catalogue_bench(
    settings: Settings,
    events: Path,
    n_items: int,
    limit: int,
    log: Callable[[str], Any],
    sample_users: int = 500,
    live_events: int = 10_000,
) -> dict[str, Any]:
    from consumers.worker import build_recommender

    parsed = [decode_event(line) for line in load_lines(events, limit)]
    half = len(parsed) // 2
    rec = build_recommender(settings)
    rec.candidates.min_items = 0  # no index while the first half is learned without lists
    t0 = time.perf_counter()
    for ev in parsed[:half]:
        rec.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
    log(f"catalogue: learned {half:,} events in {time.perf_counter() - t0:.1f} s; {len(rec.items):,} items")

    learned = rec.mf.item_matrix()[: len(rec.items)].astype(np.float64)
    grow = max(n_items - len(rec.items), 0)
    rng = np.random.default_rng(settings.model.seed)
    cov = np.cov(learned, rowvar=False) if len(learned) > 1 else np.eye(rec.mf.n_factors) * 0.01
    factors = rng.multivariate_normal(learned.mean(axis=0), cov, size=grow).astype(np.float32)
    rec.mf.seed_items([f"synthetic-{i}" for i in range(grow)], factors)
    del factors
    log(f"catalogue: grown to {len(rec.items):,} items (factors ~ Gaussian fit of the learned ones)")

    rec.candidates.min_items = 1
    t0 = time.perf_counter()
    rec.build_index()
    build_s = time.perf_counter() - t0
    log(f"catalogue: HNSW index built in {build_s:.1f} s")

    n = rec.n
    users = _sample_users(rec, list(dict.fromkeys(ev.user_id for ev in parsed[:half])), sample_users, 1)
    fresh = _compare(rec, users, n)
    log(
        f"catalogue: top-{n} exact {fresh['exact_ms_per_user']} ms, approximate "
        f"{fresh['approx_ms_per_user']} ms per user, recall@{n} {fresh[f'recall_at_{n}']}"
    )

    index = rec.approximate_index
    assert index is not None
    before = index.flushes, index.flushed_rows, index.flush_seconds
    live = parsed[half : half + live_events]
    t0 = time.perf_counter()
    for ev in live:
        rec.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
        rec.recommend(ev.user_id)
    live_s = time.perf_counter() - t0
    flushes, rows, flush_s = (
        now - then
        for now, then in zip((index.flushes, index.flushed_rows, index.flush_seconds), before, strict=True)
    )
    log(
        f"catalogue: {len(live):,} live events at {len(live) / live_s:,.0f}/s (list per event); "
        f"{flushes} re-index batches, {rows:,} rows, {flush_s:.1f} s"
    )
    after = _compare(rec, users, n)
    log(f"catalogue: after live updates recall@{n} {after[f'recall_at_{n}']}")
    return {
        "items": len(rec.items),
        "users_sampled": len(users),
        "n": n,
        "index_build_s": round(build_s, 1),
        "fresh_index": fresh,
        "live_events": len(live),
        "live_events_per_s": round(len(live) / live_s, 1),
        "reindex_batches": flushes,
        "reindex_rows": rows,
        "reindex_s": round(flush_s, 2),
        "reindex_share_of_live_time": round(flush_s / live_s, 3),
        "after_live_updates": after,
        "ann_expansion": rec.candidates.expansion,
        "ann_pending_max": rec.candidates.pending_max,
        "source": str(events),
    }
