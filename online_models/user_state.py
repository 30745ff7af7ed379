"""What the recommender keeps per user: consumed items, decayed interest in touched items, the
session's last items and what was done to them; and its JSON form for checkpoints."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from online_models.explain import History


@dataclass
class UserState:
    events: int = 0
    last_ts: float = -math.inf
    consumed: set[int] = field(default_factory=set)
    # row -> (interest as of ``seen``, seen) for touched, unconsumed items; oldest first.
    interest: dict[int, tuple[float, float]] = field(default_factory=dict)
    # The last items the user touched (any type), for the session part of the query vector.
    session: deque[int] = field(default_factory=deque)
    # What the user last did to each session item (event type), for explanations.
    kinds: dict[int, str] = field(default_factory=dict)

    def touch(self, row: int, kind: str, ts: float, consuming: bool) -> None:
        """Count an event on ``row``; a consuming one (purchase, rating) ends the interest in it."""
        self.events += 1
        self.last_ts = max(self.last_ts, ts)
        self.session.append(row)
        self.kinds[row] = kind
        if len(self.kinds) > 2 * (self.session.maxlen or len(self.session)):
            self.kinds = {r: self.kinds[r] for r in self.session if r in self.kinds}
        if consuming:
            self.consumed.add(row)
            self.interest.pop(row, None)

    def remember(self, row: int, weight: float, ts: float, half_life_s: float, memory: int) -> None:
        """Add ``weight`` to the decayed interest in ``row``; keep the ``memory`` newest rows."""
        previous = self.interest.pop(row, None)
        if previous is not None:
            weight += previous[0] * math.pow(2.0, -max(ts - previous[1], 0.0) / half_life_s)
        self.interest[row] = (weight, ts)
        if len(self.interest) > memory:
            del self.interest[next(iter(self.interest))]

    def interest_scores(self, weight: float, half_life_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The touched rows and ``weight`` x their interest decayed to the user's last event."""
        count = len(self.interest)
        touched = np.fromiter(self.interest, dtype=np.int64, count=count)
        # (weight, ts) pairs, flattened: 3x cheaper than np.array() of a list of tuples.
        value_seen = np.fromiter(
            chain.from_iterable(self.interest.values()), dtype=np.float64, count=2 * count
        ).reshape(count, 2)
        age = np.maximum(self.last_ts - value_seen[:, 1], 0.0)
        return touched, weight * value_seen[:, 0] * np.exp2(-age / half_life_s)

    def history(self, listed: np.ndarray) -> History:
        """What an explanation of the rows ``listed`` reads of this user."""
        return History(
            rows=np.array(list(dict.fromkeys(reversed(self.session))), dtype=np.int64),
            kinds=self.kinds,
            own={row: self.kinds.get(row, "view") for row in listed.tolist() if row in self.interest},
        )

    def to_json(self) -> list[Any]:
        return [
            self.events,
            self.last_ts,
            sorted(self.consumed),
            [[row, value, seen] for row, (value, seen) in self.interest.items()],
            list(self.session),
            [[row, kind] for row, kind in self.kinds.items()],
        ]

    @classmethod
    def from_json(cls, data: list[Any], session_items: int) -> UserState:
        events, last_ts, consumed, interest, session, kinds = data
        return cls(
            events,
            last_ts,
            set(consumed),
            {row: (value, seen) for row, value, seen in interest},
            deque(session, maxlen=session_items),
            {row: kind for row, kind in kinds},
        )
