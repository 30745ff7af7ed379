"""Top-N selection over a dense score vector, with exclusions, without sorting the catalogue.

>>> import numpy as np
>>> idx, scores = top_n(np.array([0.1, 0.9, 0.5, 0.9]), 3, exclude=[3])
>>> idx.tolist(), scores.tolist()
([1, 2, 0], [0.9, 0.5, 0.1])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Above this size a strided sample picks a safe threshold first (argpartition of 55k floats costs
# ~0.4 ms; a sample of 1/16 of them plus one comparison pass costs ~0.08 ms).
_SAMPLE_FROM = 4096
_STRIDE = 16


def top_n(
    scores: np.ndarray, n: int, exclude: Iterable[int] = (), in_place: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``n`` best entries, best first, never an excluded index.

    Ties break towards the lower index, so the answer does not depend on call order.
    ``in_place=True`` lets it overwrite excluded entries of ``scores`` instead of copying.
    """
    excluded = np.fromiter(exclude, dtype=np.int64)
    if excluded.size:
        if not in_place:
            scores = scores.copy()
        scores[excluded] = -np.inf
    k = min(n, scores.size - excluded.size)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
    candidates = np.flatnonzero(scores >= kth_floor(scores, k))
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    chosen = candidates[order]
    return chosen, scores[chosen]


def kth_floor(scores: np.ndarray, k: int) -> float:
    """A value at most the ``k``-th largest score, cheaply (so nothing of the top ``k`` is lost);
    ``-inf`` entries are excluded ones, and ``-inf`` comes back when fewer than ``k`` are finite."""
    if scores.size >= _SAMPLE_FROM and k * _STRIDE * 4 < scores.size:
        sample = scores[::_STRIDE]
        # The k-th largest of a subset is at most the k-th largest of the whole.
        threshold = float(np.partition(sample, sample.size - k)[sample.size - k])
        if threshold > -np.inf:
            return threshold
    if k == scores.size:  # nothing excluded, everything wanted
        return -np.inf
    return float(np.partition(scores, scores.size - k)[scores.size - k])


def kth_largest(scores: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """The ``k``-th largest of ``scores`` (``-inf`` when fewer than ``k`` are finite) and the
    indices of the scores at or above it (ascending), without partitioning them all: only those
    at or above :func:`kth_floor`."""
    k = min(k, scores.size)
    if k <= 0:
        return -np.inf, np.arange(scores.size)
    rows = np.flatnonzero(scores >= kth_floor(scores, k))
    top = scores[rows]
    kth = float(np.partition(top, top.size - k)[top.size - k])
    return kth, rows[top >= kth]
