"""Lists from the approximate index (online_models.ann) against exact scoring of every item."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

from online_models import ann
from online_models.recommender import Recommender
from online_models.topn import top_n
from pushrec.demo import SAMPLE_EVENTS
from stream.events import decode_event
from stream.replay import read_lines

pytestmark = pytest.mark.skipif(not ann.available(), reason="needs the [ann] extra (usearch)")


def trained(n_items: int, **options: Any) -> tuple[Recommender, list[str]]:
    """The product model on the bundled sample, its catalogue grown with random factors."""
    rec = Recommender(seed=5, **options)
    events = [decode_event(line) for _, line in read_lines(SAMPLE_EVENTS)]
    for ev in events:
        rec.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
    grow = n_items - len(rec.items)
    rng = np.random.default_rng(0)
    rec.mf.seed_items([f"s{i}" for i in range(grow)], rng.normal(0, 0.3, (grow, rec.mf.n_factors)))
    return rec, list(dict.fromkeys(ev.user_id for ev in events))


def recall(rec: Recommender, users: list[str]) -> float:
    hits = [len(set(rec.recommend(u, exact=True).items) & set(rec.recommend(u).items)) / rec.n for u in users]
    return float(np.mean(hits))


def test_approximate_lists_recall_the_exact_ones() -> None:
    rec, users = trained(30_000, ann_min_items=10_000)
    rec.build_index()
    assert recall(rec, users) >= 0.95
    assert rec.approximate_index is not None and len(rec.approximate_index) == 30_000


def test_a_batch_of_users_gets_the_lists_each_would_get_alone() -> None:
    rec, users = trained(30_000, ann_min_items=10_000)
    rec.build_index()
    strangers = ["nobody", users[0]]  # a user without history gets the popularity list
    batch = rec.recommend_many([*users, *strangers], explain=True)
    alone = [rec.recommend(user, explain=True) for user in [*users, *strangers]]
    assert batch == alone
    assert {top.model for top in batch} == {"pushrec", "popularity"}


def test_a_new_item_is_listed_before_it_is_indexed() -> None:
    rec, users = trained(30_000, ann_min_items=10_000, ann_pending_max=10_000)
    user = users[0]
    rec.build_index()
    index = rec.approximate_index
    assert index is not None and index.pending == 0
    # An item arrives with factors right on the user's direction (as a cold-start prediction
    # would), long enough to outscore the rest of their list (what they re-buy scores up to 50).
    query = rec.user_query(user)
    assert query is not None
    rec.mf.seed_items(["moved"], [30 * query / np.linalg.norm(query)])
    assert rec.recommend(user).items[0] == rec.recommend(user, exact=True).items[0] == "moved"
    assert len(index) == 30_000 and index.pending == 1  # found among the pending rows, not the graph


def test_learning_marks_rows_and_batches_re_index_them() -> None:
    rec, users = trained(20_000, ann_min_items=10_000, ann_pending_max=50)
    rec.build_index()
    index = rec.approximate_index
    assert index is not None
    for t in range(200):
        rec.learn_one(users[t % len(users)], f"s{t}", "click", 2e9 + t)
        rec.recommend(users[t % len(users)])
    assert index.flushes >= 2 and index.flushed_rows >= 100
    assert recall(rec, users) >= 0.95


class _Gate:
    """A lock the background flush thread cannot take until :attr:`open` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if threading.current_thread().name == "pushrec-ann-flush":
            self.open.wait(timeout=60)
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_background_re_index_keeps_its_rows_candidates_until_they_are_in_the_graph() -> None:
    rec, users = trained(30_000, ann_min_items=10_000, ann_pending_max=1)
    user = users[0]
    index = rec.build_index()
    assert index is not None
    gate = index._lock = _Gate()  # type: ignore[assignment]
    query = rec.user_query(user)
    assert query is not None
    rec.mf.seed_items(["moved"], [30 * query / np.linalg.norm(query)])  # the user's best item
    # The list starts the re-index of the new row, which waits for the graph: the row is a
    # candidate all the same.
    assert rec.recommend(user).items[0] == "moved"
    assert index.flushing and index.pending == 0 and not index.due()
    gate.open.set()
    index.wait()
    assert not index.flushing and index.flushes == 1 and len(index) == 30_001
    found, pending = index.candidates(query, k=1)
    assert found.tolist() == [rec.items.row("moved")] and pending.size == 0
    assert rec.recommend(user).items[0] == "moved"


def test_a_search_goes_before_the_next_chunk_of_a_background_re_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flush lets go of the graph between chunks; a search waiting for it goes next (a plain
    lock let the flush take it straight back, and the search waited for the whole flush)."""
    rec, users = trained(12_000, ann_min_items=10_000)
    index = rec.build_index()
    assert index is not None
    graph, order = index._index, []
    add, search = graph.add, graph.search
    holding, waiting = threading.Event(), threading.Event()

    def slow_add(*args: Any, **kwargs: Any) -> Any:
        if not order:  # the first chunk holds the graph until the search waits for it
            holding.set()
            waiting.wait(timeout=30)
        order.append("chunk")
        return add(*args, **kwargs)

    def logged_search(*args: Any, **kwargs: Any) -> Any:
        order.append("search")
        return search(*args, **kwargs)

    monkeypatch.setattr(ann, "_REINSERT_CHUNK", 1)
    monkeypatch.setattr(graph, "add", slow_add)
    monkeypatch.setattr(graph, "search", logged_search)
    index.changed([3, 4, 5])
    index.flush(rec.mf.item_matrix(), background=True)
    query = rec.user_query(users[0])
    assert query is not None
    assert holding.wait(timeout=30)
    searching = threading.Thread(target=index.candidates, args=(query, 5))
    searching.start()
    for _ in range(30_000):  # until it waits for the first chunk
        if index._searches:
            break
        threading.Event().wait(0.001)
    assert index._searches == 1
    waiting.set()
    searching.join(timeout=30)
    index.wait()
    assert not searching.is_alive()
    assert order == ["chunk", "search", "chunk", "chunk"]


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_re_index_is_raised_and_its_rows_stay_candidates(
    background: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, _ = trained(12_000, ann_min_items=10_000)
    index = rec.build_index()
    assert index is not None

    def broken(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("out of memory")

    monkeypatch.setattr(index._index, "add", broken)
    index.changed([3, 4])
    with pytest.raises(RuntimeError, match="re-indexing"):  # in a thread: by the wait (or next flush)
        index.flush(rec.mf.item_matrix(), background=background)
        index.wait()
    assert {3, 4} <= set(index.candidates(np.ones(rec.mf.n_factors, dtype=np.float32), k=1)[1].tolist())
    with pytest.raises(RuntimeError, match="re-indexing"):
        index.flush(rec.mf.item_matrix())


def test_the_shared_and_own_candidates_rank_as_one_blend_over_both() -> None:
    """A batch scores its shared candidates (thousands of rows not re-indexed yet) apart from each
    user's own; the lists are those of one blend over all of a user's candidates."""
    rec, users = trained(30_000, ann_min_items=10_000, ann_pending_max=100_000)
    index = rec.build_index()
    assert index is not None
    for t in range(3000):  # rows pile up, pending
        rec.learn_one(users[t % len(users)], f"s{(t * 7919) % 30_000}", "click", 2e9 + t)
    assert index.pending > 2000
    tops = rec.recommend_many(users)
    for user, top in zip(users, tops, strict=True):
        state = rec.users.get(user)
        query = rec.user_query(user)
        assert state is not None and query is not None and top.model == "pushrec"
        extras = rec._related(state)
        excluded = extras.excluded(state.consumed)
        shared, mine = rec.candidates.search(
            index, query[None], rec.n, [[*state.interest_rows, *extras.rows]], [excluded]
        )
        rows = np.union1d(shared, mine[0])
        rows = rows[~np.isin(rows, excluded)]
        picked, values = top_n(rec._blend(query, state, rows, extras), rec.n)
        assert top.items == [rec.items.ids[r] for r in rows[picked].tolist()]
        assert np.allclose(top.scores, values, rtol=1e-6)


def test_a_consumed_row_waiting_for_its_re_index_stays_off_the_list() -> None:
    """Rows not re-indexed yet are scored for every list of a batch at once; the rows a user
    consumed among them are still left out of that user's list, and only of theirs."""
    rec, users = trained(30_000, ann_min_items=10_000, ann_pending_max=100_000, rebuy_weight=0.0)
    rec.build_index()
    buyer, other = users[0], users[1]
    query = rec.user_query(buyer)
    assert query is not None
    rec.mf.seed_items(["bought"], [30 * query / np.linalg.norm(query)])  # the buyer's best item
    before = rec.recommend_many([buyer, other])
    assert before[0].items[0] == "bought"
    rec.learn_one(buyer, "bought", "purchase", 2e9)
    index = rec.approximate_index
    assert index is not None and rec.items.row("bought") in index.candidates(query, 1)[1]  # pending
    after = rec.recommend_many([buyer, other])
    assert "bought" not in after[0].items
    assert after[1] == rec.recommend(other) and after[0] == rec.recommend(buyer)


def test_the_popular_head_is_the_most_popular_touched_rows() -> None:
    """Scored beside the graph's candidates: the most popular rows, never an untouched one (it
    adds nothing to a score, and a large catalogue is mostly untouched rows)."""
    rec = Recommender(seed=5, ann_min_items=10_000, ann_pending_max=50)
    users = [f"u{u}" for u in range(20)]
    for t in range(100):  # 40 items touched
        rec.learn_one(users[t % 20], f"i{t % 40}", "click", 2e9 + t)
    factors = np.random.default_rng(0).normal(0, 0.3, (30_000, rec.mf.n_factors))
    rec.mf.seed_items([f"s{i}" for i in range(30_000)], factors)
    rec.learn_one(users[0], "s29999", "click", 2e9 + 100)  # popularity's rows now span the catalogue
    rec.build_index()

    def head_holds_the_top_of_the_touched() -> int:
        """The head, with the rows moved since it was taken (pending), holds every row more
        popular than the 257th, and only touched rows."""
        head, counts = rec.candidates._popular_head, rec.popularity.scores()
        index = rec.approximate_index
        assert index is not None
        touched = np.flatnonzero(counts > 0)
        assert head.size == min(256, touched.size) and set(head.tolist()) <= set(touched.tolist())
        _, pending = index.candidates(np.zeros(rec.mf.n_factors, dtype=np.float32), 1)
        kept = set(head.tolist()) | set(pending.tolist())
        floor = np.sort(counts[touched])[-257] if touched.size > 256 else 0.0
        assert set(np.flatnonzero(counts > floor).tolist()) <= kept
        return int(touched.size)

    assert head_holds_the_top_of_the_touched() == 41  # fewer touched rows than a head
    for t in range(600):  # more; flushes make a new head
        rec.learn_one(users[t % 20], f"s{t}", "click", 2e9 + 101 + t)
        rec.recommend(users[t % 20])
    assert rec.approximate_index is not None and rec.approximate_index.flushes >= 2
    assert head_holds_the_top_of_the_touched() > 256


def test_restore_rebuilds_the_index_from_the_restored_factors() -> None:
    rec, users = trained(15_000, ann_min_items=10_000)
    before = [rec.recommend(u, exact=True).items for u in users]
    again = Recommender(seed=5, ann_min_items=10_000)
    again.restore(*rec.state())
    assert again.approximate_index is None
    assert [again.recommend(u, exact=True).items for u in users] == before
    again.build_index()
    # (a multi-threaded HNSW build is not deterministic, so the approximate lists are compared
    # by recall, not equality)
    assert recall(again, users) >= 0.95 and again.approximate_index is not None


def test_the_index_is_built_in_the_background_and_lists_stay_exact_meanwhile() -> None:
    rec, users = trained(30_000, ann_min_items=10_000)
    first = rec.recommend(users[0])  # starts the build and answers by scoring every item
    assert rec.approximate_index is None and first.items == rec.recommend(users[0], exact=True).items
    rec.learn_one(users[1], "s7", "click", 3e9)  # moves rows while the graph is being filled
    index = rec.build_index()  # waits for the thread, adopts the index
    assert index is not None and rec.approximate_index is index
    assert index.pending >= 2  # the rows that moved during the build are scored exactly
    assert recall(rec, users) >= 0.95


def test_without_usearch_it_scores_every_item_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec, users = trained(12_000, ann_min_items=10_000)
    monkeypatch.setattr(ann, "Index", None)
    with caplog.at_level(logging.WARNING):
        lists = [rec.recommend(u).items for u in users[:5]]
    assert rec.approximate_index is None
    assert lists == [rec.recommend(u, exact=True).items for u in users[:5]]
    assert "usearch is not installed" in caplog.text


def test_bench_items_reports_time_and_recall() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pushrec.cli",
            "bench",
            "--items",
            "30000",
            "--events-max",
            "3000",
            "--users",
            "30",
            "--events",
            str(SAMPLE_EVENTS),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        # Few rows pending before a re-index, so that the live phase re-indexes (and says so).
        env={**os.environ, "PUSHREC_MODEL__ANN_PENDING_MAX": "200"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["items"] >= 30_000 and report["users_sampled"] == 30
    for part in ("fresh_index", "after_live_updates"):
        assert report[part]["recall_at_20"] >= 0.9 and report[part]["index_recall_at_20"] >= 0.9
        assert report[part]["exact_ms_per_user"] > 0 and report[part]["approx_ms_per_user"] > 0
    # The second half of the log, learned half with a list per event, half in micro-batches.
    assert report["live_events"] == 750 and report["ann_pending_max"] == 200
    assert report["live_events_per_s"] > 0 and report["live_events_per_s_list_per_event"] > 0
    # The real worker, restarted on the grown items: it indexed them all, then learned the live
    # events from Kafka (both halves) and wrote their lists.
    worker = report["worker"]
    assert worker["events"] == 1500 and worker["events_per_s"] > 0 and worker["restore_and_index_s"] > 0
    assert report["reindex_batches"] > 0 and report["reindex_rows"] >= 200 * report["reindex_batches"]
