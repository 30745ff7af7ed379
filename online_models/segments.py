"""Interest segments: shoppers clustered online (River's k-means) by their taste vector, each
segment named by the categories and title words of what its members engage with.

A segment's tags are its heaviest terms (counts decayed as events arrive), so names follow the
season. Used to label lists (``pushrec recs --json``) and to aim a push campaign
(``pushrec push-sender --segment TAG``).

>>> import numpy as np
>>> seg = InterestSegments(n_segments=2, seed=0)
>>> for _ in range(30):
...     _ = seg.learn_one(np.array([1.0, 0.0]), ["Comedy", "romance"])
...     _ = seg.learn_one(np.array([-1.0, 0.0]), ["Horror", "zombie"])
>>> seg.tags(seg.predict_one(np.array([-0.9, 0.1])))
['Horror', 'zombie']
>>> seg.name(np.array([-0.9, 0.1]))[1]
['Horror', 'zombie']
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np
from river import cluster

# Term weights of a segment shrink by this factor per event it learns (a half-life of ~700 events).
_DECAY = 0.999
_PRUNE_BELOW = 0.05


class InterestSegments:
    def __init__(self, n_segments: int = 8, seed: int = 42, n_tags: int = 3) -> None:
        # Centres move 2 % of the way to each point; taste vectors are ~0.1-1 in scale.
        self._kmeans = cluster.KMeans(n_clusters=n_segments, halflife=0.02, sigma=0.1, seed=seed)
        self._terms: dict[int, dict[str, float]] = {}
        self._scale: dict[int, float] = {}
        self._centres: np.ndarray | None = None  # the centres as an array (_centre_array)
        self._drawn = False
        self._tags: dict[int, list[str]] = {}  # each segment's name, until its terms change
        self.n_tags = n_tags

    def learn_one(self, vector: np.ndarray, terms: Sequence[str]) -> int:
        """Move the nearest centre towards ``vector``; credit ``terms`` to that segment; return it."""
        # The nearest centre before the move is still the nearest after it (it only got closer).
        centres = self._kmeans.centers
        # River draws a centre's coordinates on first use; once all are drawn, they stay.
        self._drawn = self._drawn or all(len(c) == vector.size for c in centres.values())
        if not self._drawn:
            # Let River draw them, and read them all again.
            segment = self._kmeans.learn_predict_one(dict(enumerate(vector.tolist())))
            self._centres = None
        else:
            # River's step, in numpy (~7x faster): the same distances summed in the same order
            # (so the same nearest centre, the first on a tie) and the same move. The array is
            # the centres from now on; River's are written at the next state().
            array = self._centre_array(vector.size)
            distances = ((array - vector) ** 2).cumsum(axis=1)[:, -1]
            segment = int(distances.argmin())
            centre = array[segment]
            centre += self._kmeans.halflife * (vector - centre)
        counts = self._terms.setdefault(segment, {})
        self._tags.pop(segment, None)
        # Decay without touching every term: newer credit is worth 1/_DECAY times more; rescale
        # (and drop terms that faded out) before the numbers grow large.
        scale = self._scale[segment] = self._scale.get(segment, 1.0) / _DECAY
        for term in terms:
            counts[term] = counts.get(term, 0.0) + scale
        if scale > 1e6:
            self._scale[segment] = 1.0
            for term, weight in list(counts.items()):
                if weight / scale < _PRUNE_BELOW:
                    del counts[term]
                else:
                    counts[term] = weight / scale
        return segment

    def predict_one(self, vector: np.ndarray) -> int:
        """The nearest centre (River's k-means holds them; the distances are taken in numpy)."""
        return int(np.argmin(((self._centre_array(vector.size) - vector) ** 2).sum(axis=1)))

    def _centre_array(self, dim: int) -> np.ndarray:
        """The centres as an array (read from River's once, then kept in step with them)."""
        if self._centres is None:
            centres = self._kmeans.centers
            rows = [[centres[c].get(i, 0.0) for i in range(dim)] for c in range(len(centres))]
            self._centres = np.array(rows)
        return self._centres

    def name(self, vector: np.ndarray) -> tuple[int | None, list[str]]:
        """The nearest segment that has a name, and its tags ((None, []) before any has one).

        A centre can be nearest to a shopper without having learned a term yet (centres move,
        and a segment is credited only by the events it was nearest to), so an unnamed nearest
        centre defers to the nearest named one: every list with a segment carries its tags.
        """
        nearest = self.predict_one(vector)
        if self._terms.get(nearest):
            return nearest, self.tags(nearest)
        named = [s for s, counts in self._terms.items() if counts]
        if not named:
            return None, []
        assert self._centres is not None  # filled by predict_one
        distances = ((self._centres[named] - vector) ** 2).sum(axis=1)
        segment = named[int(np.argmin(distances))]
        return segment, self.tags(segment)

    def tags(self, segment: int) -> list[str]:
        """The segment's name: its ``n_tags`` heaviest terms (none before it learned any). Kept
        until the segment learns again: every list a round ranks carries its segment's name, and
        a shop with thousands of categories gives a segment thousands of terms."""
        tags = self._tags.get(segment)
        if tags is None:
            counts = self._terms.get(segment)
            tags = self._tags[segment] = (
                heapq.nlargest(self.n_tags, counts, key=counts.__getitem__) if counts else []
            )
        return list(tags)

    def state(self) -> dict[str, Any]:
        if self._drawn and self._centres is not None:  # the array moved them since
            for c, centre in enumerate(self._centres.tolist()):
                self._kmeans.centers[c].update(enumerate(centre))
        return {
            "centers": {
                str(c): [[k, v] for k, v in centre.items()] for c, centre in self._kmeans.centers.items()
            },
            "terms": {str(s): list(counts.items()) for s, counts in self._terms.items()},
            "scale": {str(s): scale for s, scale in self._scale.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._centres, self._drawn, self._tags = None, False, {}
        for c, pairs in state["centers"].items():
            centre = self._kmeans.centers[int(c)]
            centre.clear()
            centre.update({int(k): v for k, v in pairs})
        self._terms = {int(s): dict(pairs) for s, pairs in state["terms"].items()}
        self._scale = {int(s): scale for s, scale in state["scale"].items()}
