"""Where a list's candidates come from: every item (exact), or from ``min_items`` catalogue rows
on an HNSW index (``online_models.ann``, the ``[ann]`` extra) built in a background thread,
plus the rows it has not caught up with, the user's own items and the popularity head."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

from online_models import ann
from online_models.mf import ImplicitMF
from online_models.popularity import Popularity
from online_models.related import locate

# Candidates the approximate path scores exactly beside the graph's: the popularity head (popularity
# only grows for touched rows, which are pending, so the head of the last flush plus the pending
# rows always contain today's head).
_POPULAR_HEAD = 256

log = logging.getLogger("online_models.recommender")


class Candidates:
    """The approximate index's life: built on first need, kept up to date row by row."""

    def __init__(
        self,
        mf: ImplicitMF,
        popularity: Popularity,
        min_items: int = 100_000,
        expansion: int = 128,
        pending_max: int = 4096,
        background: bool = True,
    ) -> None:
        """From ``min_items`` rows on (0 = never) lists come from the index; with ``background``
        it is built in a thread (usearch releases the GIL, so the event loop and its heartbeats
        go on) and lists are scored exactly meanwhile, and moved rows are re-indexed in a thread
        too (``online_models.ann``)."""
        self.mf = mf
        self.popularity = popularity
        self.min_items = min_items
        self.expansion = expansion
        self.pending_max = pending_max
        self.background = background
        self.index: ann.FactorIndex | None = None
        # A build in progress: (thread, the index it fills, start time), and rows changed meanwhile.
        self._build: tuple[threading.Thread, ann.FactorIndex, float] | None = None
        self._changed_while_building: set[int] = set()
        self._popular_head = np.empty(0, dtype=np.int64)

    @property
    def applies(self) -> bool:
        """Whether lists come from the index at this size (once it is built)."""
        return bool(self.min_items) and len(self.mf.items) >= self.min_items

    @property
    def indexed_items(self) -> int:
        """Items in the index lists come from (0: none yet); one built in the background counts
        once built (the next list adopts it). Safe to read from another thread."""
        index, build = self.index, self._build
        if index is not None:
            return len(index)
        if build is not None and not build[0].is_alive():
            return len(build[1])
        return 0

    @property
    def pending_rows(self) -> int:
        """Rows waiting for a re-index, scored exactly meanwhile (0 without an index). Safe to
        read from another thread."""
        index = self.index
        return 0 if index is None else index.pending

    def changed(self, rows: Iterable[int]) -> None:
        """These rows' factors moved: re-index them (or remember them while the index builds)."""
        if self.index is not None:
            self.index.changed(rows)
        elif self._build is not None:
            self._changed_while_building.update(rows)

    def reset(self) -> None:
        """Drop the index (restored factors): the next :meth:`current` starts rebuilding it."""
        self.index = self._build = None

    def search(
        self,
        index: ann.FactorIndex,
        queries: np.ndarray,
        n: int,
        owns: Sequence[Iterable[int]],
        consumed: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Candidate rows for each query's top-``n`` from ``index`` (:meth:`current`), in one
        search of the index for every query: the rows every query scores (sorted, unique: those
        not re-indexed yet and the popular head; they may hold a query's consumed rows), and each
        query's own (sorted, unique, none of the shared ones nor of its ``consumed``: the graph's
        nearest and ``owns[i]``, its user's touched rows). At a million items the shared rows
        are thousands and a query's own about a hundred: the caller gathers the shared rows'
        factors once for every query."""
        found, pending = index.candidates_many(queries, [2 * n + len(c) for c in consumed])
        shared = np.union1d(pending, self._popular_head)
        out = []
        for graph, own, used in zip(found, owns, consumed, strict=True):
            mine = np.unique(np.concatenate([graph, np.fromiter(own, dtype=np.int64)]))
            if shared.size:
                mine = mine[~locate(shared, mine)[1]]
            if used.size:
                mine = mine[~np.isin(mine, used, assume_unique=True)]
            out.append(mine)
        return shared, out

    def current(self) -> ann.FactorIndex | None:
        """The approximate index, brought up to date; None below ``min_items`` rows, without the
        ``[ann]`` extra (logged once), or while it is being built (the first need starts it)."""
        if not self.applies:
            return None
        size = len(self.mf.items)
        if self.index is None and not self._adopt_built():
            return None
        assert self.index is not None
        if size > self.index.indexed:
            self.index.changed(range(self.index.indexed, size))
        if self.index.due() and self.index.flush(self.mf.item_matrix(), self.background):
            self._popular_head = self._popularity_head()
        return self.index

    def build(self) -> ann.FactorIndex | None:
        """Build the index now and wait for it (None when it does not apply)."""
        if self.applies and self.index is None:
            self._adopt_built()
            if self._build is not None:
                self._build[0].join()
        return self.current()

    def _adopt_built(self) -> bool:
        """Start the build if none runs; adopt the index once built. True when it is in use."""
        if self._build is None:
            if not ann.available():
                log.warning(
                    "catalogue of %d items, but usearch is not installed: scoring every item "
                    "(pip install 'pushrec[ann]')",
                    len(self.mf.items),
                )
                self.min_items = 0
                return False
            snapshot = self.mf.item_matrix().copy()
            index = ann.FactorIndex(self.mf.n_factors, expansion=self.expansion, pending_max=self.pending_max)
            log.info("building the approximate index over %d items", len(snapshot))
            thread = threading.Thread(
                target=index.build, args=(snapshot,), name="pushrec-ann-build", daemon=True
            )
            self._build = (thread, index, time.monotonic())
            self._changed_while_building = set()
            if self.background:
                thread.start()
                return False
            thread.run()
        thread, index, started = self._build
        if thread.is_alive():
            return False
        self._build = None
        index.changed(self._changed_while_building)  # moved while their old factors were indexed
        self._changed_while_building = set()
        self.index = index
        self._popular_head = self._popularity_head()
        log.info("approximate index of %d items ready after %.1fs", len(index), time.monotonic() - started)
        return True

    def _popularity_head(self) -> np.ndarray:
        """The ``_POPULAR_HEAD`` most popular rows, sorted, among those with any popularity: an
        untouched row adds nothing to a score. (A large catalogue is mostly untouched rows, and
        numpy's partition slows down on that many ties: 170 ms at 1M items, against 9.6 ms for
        as many distinct values and 3.5 ms for the touched rows alone.)"""
        counts = self.popularity.scores()
        touched = np.flatnonzero(counts > 0)
        if touched.size <= _POPULAR_HEAD:
            return touched
        counts = counts[touched]
        return np.sort(touched[np.argpartition(counts, counts.size - _POPULAR_HEAD)[-_POPULAR_HEAD:]])
