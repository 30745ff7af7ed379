"""What the recommender keeps per user: consumed items, decayed interest in touched items, the
session's last items and what was done to them; and its JSON form for checkpoints.

Kept small, since there is one per shopper: slots, a list for the session (a deque costs ~600
bytes), no set until the first consumed item."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from online_models.explain import History

_NOTHING: frozenset[int] = frozenset()
_TINY = 1e-300  # the interest of a zero-weight event (its log must stay finite)


@dataclass(slots=True)
class UserState:
    events: int = 0
    last_ts: float = -math.inf
    # Rows the user purchased or rated (a set from the first one on).
    consumed: set[int] | frozenset[int] = _NOTHING
    # row -> level of the user's decayed interest in a touched, unconsumed item, oldest first: the
    # interest at time t is 2 ** (level - t / half-life), so one float holds the sum of every
    # event's decayed weight (a (weight, time) tuple took 104 bytes more per item).
    interest: dict[int, float] = field(default_factory=dict)
    # The last items the user touched (any type), oldest first, for the session part of the query.
    session: list[int] = field(default_factory=list)
    # What the user last did to each session item (event type), for explanations.
    kinds: dict[int, str] = field(default_factory=dict)
    # The Kafka partition the user's events come from (-1: not known): the unit of checkpoints
    # and of ownership across workers. Not in the JSON form: a partition's checkpoint implies it.
    partition: int = -1

    def touch(self, row: int, kind: str, ts: float, consuming: bool, session_items: int) -> None:
        """Count an event on ``row``; a consuming one (purchase, rating) ends the interest in it."""
        self.events += 1
        self.last_ts = max(self.last_ts, ts)
        self.session.append(row)
        if len(self.session) > session_items:
            del self.session[0]
        self.kinds[row] = kind
        if len(self.kinds) > 2 * session_items:
            self.kinds = {r: self.kinds[r] for r in self.session if r in self.kinds}
        if consuming:
            if isinstance(self.consumed, frozenset):
                self.consumed = set()
            self.consumed.add(row)
            self.interest.pop(row, None)

    def remember(self, row: int, weight: float, ts: float, half_life_s: float, memory: int) -> None:
        """Add ``weight`` to the decayed interest in ``row``; keep the ``memory`` newest rows."""
        level = math.log2(max(weight, _TINY)) + ts / half_life_s
        previous = self.interest.pop(row, None)
        if previous is not None:  # log2(2 ** previous + 2 ** level), without overflow
            high, low = max(previous, level), min(previous, level)
            level = high + math.log2(1.0 + 2.0 ** (low - high))
        self.interest[row] = level
        if len(self.interest) > memory:
            del self.interest[next(iter(self.interest))]

    def interest_scores(self, weight: float, half_life_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The touched rows and ``weight`` x their interest decayed to the user's last event."""
        count = len(self.interest)
        touched = np.fromiter(self.interest, dtype=np.int64, count=count)
        levels = np.fromiter(self.interest.values(), dtype=np.float64, count=count)
        return touched, weight * np.exp2(levels - self.last_ts / half_life_s)

    def history(self, listed: np.ndarray) -> History:
        """What an explanation of the rows ``listed`` reads of this user."""
        return History(
            rows=np.array(list(dict.fromkeys(reversed(self.session))), dtype=np.int64),
            kinds=self.kinds,
            own={row: self.kinds.get(row, "view") for row in listed.tolist() if row in self.interest},
        )

    def to_json(self, row_key: Callable[[int], int] = int) -> list[Any]:
        """The JSON form, each row written as ``row_key(row)`` (checkpoints that travel to another
        worker write an index into a list of item ids: rows are one worker's numbering)."""
        return [
            self.events,
            self.last_ts,
            sorted(map(row_key, sorted(self.consumed))),  # keys handed out in a fixed order
            [[row_key(row), level] for row, level in self.interest.items()],
            [row_key(row) for row in self.session],
            [[row_key(row), kind] for row, kind in self.kinds.items()],
        ]

    @classmethod
    def from_json(
        cls, data: list[Any], session_items: int, half_life_s: float, row_of: Callable[[int], int] = int
    ) -> UserState:
        """Read :meth:`to_json`; ``row_of`` turns a written key back into a row."""
        events, last_ts, consumed, interest, session, kinds = data
        return cls(
            events,
            last_ts,
            {row_of(key) for key in consumed} if consumed else _NOTHING,
            # [row, level]; checkpoints before 2026-12-01 hold [row, weight, seen]
            {
                row_of(entry[0]): entry[1]
                if len(entry) == 2
                else math.log2(max(entry[1], _TINY)) + entry[2] / half_life_s
                for entry in interest
            },
            [row_of(key) for key in session[-session_items:]],
            {row_of(key): kind for key, kind in kinds},
        )
