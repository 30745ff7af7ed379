"""Approximate inner-product search over item factors for large catalogues (usearch HNSW).

Item factors move with every event, and re-inserting a vector into an HNSW graph costs ~0.1 ms,
so the index is allowed to lag: a row whose factors changed since it was indexed is *pending*.
A search returns the graph's nearest rows together with every pending row, and the caller scores
those candidates exactly with the current factors; pending rows are re-inserted in one batched,
multi-threaded ``add`` once there are ``pending_max`` of them. What the graph holds is therefore
never more than ``pending_max`` changes stale, and a changed row is never missed for being stale.

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

import os
import time
from collections.abc import Iterable

import numpy as np

try:
    from usearch.index import Index
except ImportError:  # pragma: no cover - exercised by the install without the [ann] extra
    Index = None  # type: ignore[assignment,misc]


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

    def flush(self, matrix: np.ndarray) -> int:
        """Re-insert the pending rows with their current factors; returns how many."""
        if not self._count:
            return 0
        started = time.perf_counter()
        rows = np.sort(self._rows[: self._count])
        self._flag[rows] = False
        self._count = 0
        old = rows[rows < self.indexed]
        if old.size:
            self._index.remove(old)
        self._index.add(rows, np.ascontiguousarray(matrix[rows]), threads=self._threads)
        self.indexed = max(self.indexed, int(rows[-1]) + 1)
        self.flushes += 1
        self.flushed_rows += int(rows.size)
        self.flush_seconds += time.perf_counter() - started
        return int(rows.size)

    def due(self) -> bool:
        """Whether enough rows are pending that a :meth:`flush` is worth its cost."""
        return self._count >= self.pending_max

    def candidates(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers worth scoring exactly: the graph's ``k`` best for ``query``, and every
        pending row (the two may overlap)."""
        found = np.empty(0, dtype=np.int64)
        if len(self._index):
            matches = self._index.search(query, min(k, len(self._index)), threads=1)
            found = np.asarray(matches.keys, dtype=np.int64)
        return found, self._rows[: self._count]
