"""`pushrec bench --items N`: top-N over a large catalogue, approximate (HNSW) against exact.

In process, no servers. The product model learns the first half of the events; the catalogue is
then grown to ``N`` items whose factors are drawn from a Gaussian fitted to the learned item
factors (the shops we have hold at most 55k items); then, for a sample of users:

1. exact: every item scored (`Recommender.recommend(exact=True)`), time per user;
2. approximate: the HNSW index (`online_models.ann`), time per user, recall@n against (1);
3. live: events of the second half learned with lists refreshed as the worker refreshes them,
   so the index lags and is re-indexed (in the background) in batches: first a list per event,
   then micro-batches of ``WORKER__BATCH_MAX`` events with one list per touched user (one index
   search for all of them); events/s of each, re-index time, and (1)/(2) again afterwards, so
   recall is also measured on an index that has been kept up to date.
4. worker (``worker=True``): the real ``pushrec worker`` (Faust process, model process, Redis
   writes, checkpoints) restarted on the grown item state of (1), before any live event: it
   restores it from a checkpoint, builds its index, then takes in the same live events as (3)
   from Kafka as fast as it can; events/s as ``pushrec bench`` measures the pipeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from consumers.recovery import ITEMS, pack_items
from infra.kafka import KafkaAccess
from infra.metrics import metric_sum, scrape
from infra.settings import Settings
from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender
from online_models.topn import top_n
from pushrec.bench import Run, cpu_split, load_lines, measure_backlog, replay, servers
from pushrec.demo import wait_for
from stream.events import decode_event
from stream.replay import Pacing


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
    worker: bool = False,
) -> dict[str, Any]:
    from consumers.worker import build_recommender

    lines = load_lines(events, limit)
    parsed = [decode_event(line) for line in lines]
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

    items_blob = pack_items(rec) if worker else b""  # the worker restarts from here
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
    live = parsed[half : half + 2 * live_events]
    per_event, batched = live[: len(live) // 2], live[len(live) // 2 :]
    t0 = time.perf_counter()
    for ev in per_event:
        rec.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
        rec.recommend(ev.user_id)
    index.wait()
    per_event_rate = len(per_event) / (time.perf_counter() - t0)
    log(f"catalogue: {len(per_event):,} live events at {per_event_rate:,.0f}/s with a list per event")

    pipeline = RefreshPipeline(rec)
    size = settings.worker.batch_max
    t0 = time.perf_counter()
    for at in range(0, len(batched), size):
        pipeline.process(batched[at : at + size])
    index.wait()
    live_s = time.perf_counter() - t0
    flushes, rows, flush_s = (
        now - then
        for now, then in zip((index.flushes, index.flushed_rows, index.flush_seconds), before, strict=True)
    )
    log(
        f"catalogue: {len(batched):,} live events at {len(batched) / live_s:,.0f}/s in micro-batches of "
        f"{size}; {flushes} re-index batches in all, {rows:,} rows, {flush_s:.1f} s (in the background)"
    )
    after = _compare(rec, users, n)
    log(f"catalogue: after live updates recall@{n} {after[f'recall_at_{n}']}")
    items = len(rec.items)
    in_worker = None
    if worker:
        del rec, pipeline, index  # its memory, for the worker's
        in_worker = _worker_rate(settings, items_blob, lines[half : half + len(live)], n_items, log)
    return {
        "items": items,
        "users_sampled": len(users),
        "n": n,
        "index_build_s": round(build_s, 1),
        "fresh_index": fresh,
        "live_events": len(batched),
        "live_events_per_s": round(len(batched) / live_s, 1),
        "live_batch_max": size,
        "live_events_per_s_list_per_event": round(per_event_rate, 1),
        "reindex_batches": flushes,
        "reindex_rows": rows,
        "reindex_s": round(flush_s, 2),
        "after_live_updates": after,
        "worker": in_worker,
        "ann_expansion": settings.model.ann_expansion,
        "ann_pending_max": settings.model.ann_pending_max,
        "source": str(events),
    }


def _worker_rate(
    settings: Settings, items_blob: bytes, lines: list[bytes], n_items: int, log: Callable[[str], Any]
) -> dict[str, Any]:
    """``pushrec worker`` restarted on ``items_blob``, its index built, then ``lines`` from Kafka."""
    workdir = Path(tempfile.mkdtemp(prefix="pushrec-bench-items-"))
    events = workdir / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    with servers(settings, workdir) as server_env:
        run = Run({**os.environ, **server_env}, workdir, "i")
        run.env |= {  # the checkpoint written here; an index whatever the size, as in (1)-(3)
            "PUSHREC_CHECKPOINT__STORE": "disk",
            "PUSHREC_CHECKPOINT__NAME": run.prefix,
            "PUSHREC_MODEL__ANN_MIN_ITEMS": "1",
        }
        checkpoint = Path(server_env["PUSHREC_STATE_DIR"]) / "checkpoints" / run.prefix / f"{ITEMS}.npz"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(items_blob)
        bootstrap = server_env.get("PUSHREC_KAFKA_BOOTSTRAP") or settings.kafka_bootstrap
        kafka = KafkaAccess.from_settings(settings, str(bootstrap))
        timings: dict[str, float] = {}

        def prepare(port: int, process: subprocess.Popen[bytes]) -> None:
            started = time.monotonic()
            wait_for(
                f"the worker's index over {n_items:,} items",
                lambda: metric_sum(scrape(port), "pushrec_approximate_index_items") >= n_items,
                1800,
                process,
            )
            timings["restore_and_index_s"] = time.monotonic() - started
            log(
                f"catalogue: the worker restored and indexed {n_items:,} items "
                f"in {timings['restore_and_index_s']:.0f} s"
            )
            replay(kafka, settings, run, events, Pacing())

        try:
            backlog = measure_backlog(run, len(lines), prepare)
        finally:  # hundreds of MB at 1M items; the logs stay
            shutil.rmtree(checkpoint.parent.parent, ignore_errors=True)
            events.unlink(missing_ok=True)
    log(
        f"catalogue: the worker took in {len(lines):,} live events at {backlog.events_per_s:,.0f}/s "
        f"(from Kafka, to Redis); {backlog.lists_per_event:.2f} lists per event; {cpu_split(backlog.cpu)}"
    )
    return {
        "events": len(lines),
        "events_per_s": round(backlog.events_per_s, 1),
        "cpu": backlog.cpu,
        "lists_per_event": backlog.lists_per_event,
        "restore_and_index_s": round(timings["restore_and_index_s"], 1),
        "peak_rss_bytes": backlog.peak_rss_bytes,
        "logs": str(workdir),
    }
