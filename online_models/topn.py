"""Top-N selection over a dense score vector, with exclusions, in one numpy pass.

>>> import numpy as np
>>> idx, scores = top_n(np.array([0.1, 0.9, 0.5, 0.9]), 3, exclude=[3])
>>> idx.tolist(), scores.tolist()
([1, 2, 0], [0.9, 0.5, 0.1])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def top_n(scores: np.ndarray, n: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``n`` best entries, best first, never an excluded index.

    Ties break towards the lower index, so the answer does not depend on call order.
    """
    excluded = np.fromiter(exclude, dtype=np.int64)
    if excluded.size:
        scores = scores.copy()
        scores[excluded] = -np.inf
    available = scores.size - excluded.size
    k = min(n, available)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
    if k < scores.size:
        # Partition on (score, -index) so equal scores keep the lowest indices.
        candidates = np.argpartition(-scores, k - 1)[:k]
        threshold = scores[candidates].min()
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(scores.size)
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    chosen = candidates[order]
    return chosen, scores[chosen]
