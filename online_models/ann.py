"""Approximate inner-product search over item factors for large catalogues (usearch HNSW).

Item factors move with every event, and re-inserting a vector into an HNSW graph costs ~0.1 ms,
so the index is allowed to lag: a row whose factors changed since it was indexed is *pending*.
A search returns the graph's nearest rows together with every pending row, and the caller scores
those candidates exactly with the current factors; pending rows are re-inserted in one batch
once there are ``pending_max`` of them, either at once on every thread or in the background
(:meth:`FactorIndex.flush`): a thread re-inserts them a chunk at a time while they stay
candidates, and a search waits at most for one chunk (the graph is never read while it changes).
A changed row is therefore never missed for being stale. Re-inserts search the graph with a
narrower beam than the build (``_REINSERT_EXPANSION``): a third of the cost, the same recall
(1M items: see docs/benchmarks.md).

>>> import numpy as np
>>> matrix = np.eye(4, dtype=np.float32)
>>> index = FactorIndex(n_factors=4)
>>> index.build(matrix)
>>> found, pending = index.candidates(np.array([0, 0, 1, 0], dtype=np.float32), k=1)
>>> found.tolist(), pending.tolist()
([2], [])
>>> index.changed([3, 3])                        # row 3 moved: a candidate until re-indexed
>>> [part.tolist() for part in index.candidates(np.array([0, 0, 1, 0], dtype=np.float32), k=1)]
[[2], [3]]
>>> index.flush(matrix), index.pending      # re-inserted one row; nothing pending
(1, 0)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

try:
    from usearch.index import Index
except ImportError:  # pragma: no cover - exercised by the install without the [ann] extra
    Index = None  # type: ignore[assignment,misc]


# A re-insert's beam (the build's is ``expansion``), and the rows re-inserted per hold of the lock
# in a background flush (~64 ms on one thread at 1M items).
_REINSERT_EXPANSION = 32
_REINSERT_CHUNK = 512

log = logging.getLogger("online_models.recommender")


def available() -> bool:
    """Whether the ``[ann]`` extra (usearch) is installed."""
    return Index is not None


class FactorIndex:
    """An HNSW graph over item factor rows plus the set of rows changed since they were indexed."""

    def __init__(
        self,
        n_factors: int,
        expansion: int = 64,
        connectivity: int = 16,
        pending_max: int = 4096,
        threads: int | None = None,
    ) -> None:
        if Index is None:
            raise RuntimeError("approximate search needs the [ann] extra: pip install 'pushrec[ann]'")
        self._index = Index(
            ndim=n_factors,
            metric="ip",
            dtype="f32",
            connectivity=connectivity,
            expansion_add=expansion,
            expansion_search=expansion,
        )
        self.expansion = expansion
        self.pending_max = pending_max
        self._threads = threads or os.cpu_count() or 1
        # Pending rows, each once: the first ``_count`` entries of ``_rows``, flagged in ``_flag``.
        self._rows = np.zeros(pending_max, dtype=np.int64)
        self._count = 0
        self._flag = np.zeros(0, dtype=bool)
        self.indexed = 0  # rows 0..indexed-1 are in the graph (or pending)
        self.flushes = self.flushed_rows = 0
        self.flush_seconds = 0.0
        # A background flush: its thread and the rows it re-inserts (candidates until it ends);
        # the lock is held by whatever reads or changes the graph.
        self._flush: threading.Thread | None = None
        self._flushing = np.empty(0, dtype=np.int64)
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        # Searches waiting for the lock go before the flush's next chunk. A Lock is not fair: the
        # flush, re-taking it as soon as it let go, kept a search waiting through the whole flush
        # (at 1M items, 2.7 s of a 4.6-s stretch of micro-batches; docs/benchmarks.md).
        self._searches = 0
        self._turn = threading.Condition()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def pending(self) -> int:
        return self._count

    def build(self, matrix: np.ndarray) -> None:
        """Index every row of ``matrix`` (rows are item rows; keys are row numbers)."""
        self._flag = np.zeros(max(len(matrix), 1024), dtype=bool)
        self._count = 0
        if len(matrix):
            self._index.add(np.arange(len(matrix)), np.ascontiguousarray(matrix), threads=self._threads)
        self.indexed = len(matrix)

    def changed(self, rows: Iterable[int]) -> None:
        """Mark rows whose factors moved (or that are new) since they were indexed."""
        flag = self._flag
        for row in rows:
            if row >= flag.size:
                flag = self._flag = np.concatenate([flag, np.zeros(max(row + 1, flag.size), dtype=bool)])
            if not flag[row]:
                flag[row] = True
                if self._count == self._rows.size:
                    self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
                self._rows[self._count] = row
                self._count += 1

    def flush(self, matrix: np.ndarray, background: bool = False) -> int:
        """Re-insert the pending rows with their current factors; returns how many. With
        ``background``, in a thread (one core, chunk by chunk); rows that move meanwhile are
        pending again. Nothing is done while an earlier background flush runs."""
        self._raise_failure()
        if not self._count or self.flushing:
            return 0
        rows = np.sort(self._rows[: self._count])
        vectors = np.ascontiguousarray(matrix[rows])  # the factors now: learning goes on meanwhile
        self._flag[rows] = False
        self._count = 0
        old = rows < self.indexed
        self.indexed = max(self.indexed, int(rows[-1]) + 1)
        self._flushing = rows
        if not background:
            self._reinsert(rows, vectors, old, self._threads)
            self._raise_failure()
            return int(rows.size)
        self._flush = threading.Thread(
            target=self._reinsert, args=(rows, vectors, old, 1), name="pushrec-ann-flush", daemon=True
        )
        self._flush.start()
        return int(rows.size)

    @property
    def flushing(self) -> bool:
        """Whether a background flush is running."""
        return self._flush is not None and self._flush.is_alive()

    def wait(self) -> None:
        """Until the background flush (if any) has ended."""
        if self._flush is not None:
            self._flush.join()
        self._raise_failure()

    def _reinsert(self, rows: np.ndarray, vectors: np.ndarray, old: np.ndarray, threads: int) -> None:
        started = time.perf_counter()
        try:
            self._index.expansion_add = _REINSERT_EXPANSION  # type: ignore[misc]  # (it has a setter)
            for lo in range(0, rows.size, _REINSERT_CHUNK):
                part = slice(lo, lo + _REINSERT_CHUNK)
                with self._turn:
                    self._turn.wait_for(lambda: not self._searches)
                with self._lock:
                    if old[part].any():
                        self._index.remove(rows[part][old[part]])
                    self._index.add(rows[part], vectors[part], threads=threads)
        except BaseException as exc:  # the rows stay candidates; raised by the flush or the next
            log.exception("re-indexing %d rows failed", rows.size)
            self._failed = exc
            return
        self.flushes += 1
        self.flushed_rows += int(rows.size)
        self.flush_seconds += time.perf_counter() - started
        self._flushing = np.empty(0, dtype=np.int64)

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise RuntimeError("re-indexing the approximate index failed") from self._failed

    def due(self) -> bool:
        """Whether enough rows are pending that a :meth:`flush` is worth its cost (and none runs)."""
        return self._count >= self.pending_max and not self.flushing

    def candidates(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers worth scoring exactly: the graph's ``k`` best for ``query``, and every
        pending row (the two may overlap)."""
        found, pending = self.candidates_many(query[np.newaxis], [k])
        return found[0], pending

    def candidates_many(self, queries: np.ndarray, ks: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """:meth:`candidates` for each row of ``queries`` (its ``ks[i]`` best), searched in one
        call on every thread; the pending rows are the same for all."""
        pending = self._rows[: self._count]
        flushing = self._flushing
        if flushing.size:
            pending = np.concatenate([pending, flushing])
        size = len(self._index)
        if not size:
            return [np.empty(0, dtype=np.int64) for _ in ks], pending
        count = min(max(ks), size)
        threads = 1 if len(ks) == 1 else self._threads
        with self._turn:
            self._searches += 1
        try:
            with self._lock:
                matches = self._index.search(np.ascontiguousarray(queries), count, threads=threads)
        finally:
            with self._turn:
                self._searches -= 1
                self._turn.notify_all()
        keys = np.atleast_2d(np.asarray(matches.keys, dtype=np.int64))
        counts = getattr(matches, "counts", None)  # None for one query (``Matches``)
        counts = np.atleast_1d(keys.shape[1] if counts is None else counts)
        # Nearest first, so a search for fewer is a prefix (the beam is ``expansion`` wide).
        found = [keys[i, : min(int(counts[i]), k)] for i, k in enumerate(ks)]
        return found, pending
