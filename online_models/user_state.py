"""What the recommender keeps per user: consumed items, decayed interest in touched items, the
session's last items and what was done to them; and its JSON form for checkpoints.

Kept small, since there is one per shopper (bench: bytes per user): slots; the session and the
interest in flat arrays (no Python int or float object per entry, no dict); the event type of
each session item in the low bits of its entry; no set until the first consumed item."""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from online_models.explain import History

_NOTHING: frozenset[int] = frozenset()
_TINY = 1e-300  # the interest of a zero-weight event (its log must stay finite)
# Event types a session entry records (3 bits); another type reads back as "view".
_KINDS = ("view", "click", "add_to_cart", "purchase", "rating", "push_open")
_CODE = {kind: code for code, kind in enumerate(_KINDS)}
_SHIFT = 3


def _pairs(values: array[float] | None) -> zip[tuple[int, float]]:
    """An array of (entry, float) pairs as such, the entries as ints (None: none)."""
    values = values or array("d")
    return zip(map(int, values[::2]), values[1::2], strict=True)


def _kind(entry: int) -> str:
    code = entry & ((1 << _SHIFT) - 1)
    return _KINDS[code] if code < len(_KINDS) else "view"


@dataclass(slots=True)
class UserState:
    events: int = 0
    last_ts: float = -math.inf
    # Rows the user purchased or rated (a set from the first one on).
    consumed: set[int] | frozenset[int] = _NOTHING
    # The last items the user touched (any type), oldest first: row << 3 | event type code.
    entries: array[int] = field(default_factory=lambda: array("i"))
    # Touched, unconsumed items, oldest first, as pairs (row << 3 | the type code of the last
    # positive event on it, the level of the user's decayed interest in it) in one array: the
    # interest at time t is 2 ** (level - t / half-life), so one float holds the sum of every
    # event's decayed weight. None until the first positive event.
    interest: array[float] | None = None
    # Items the user bought, and how often: row << 8 | count (at most 255). None until the first.
    bought: array[int] | None = None
    # The Kafka partition the user's events come from (-1: not known): the unit of checkpoints
    # and of ownership across workers. Not in the JSON form: a partition's checkpoint implies it.
    partition: int = -1

    @property
    def session(self) -> list[int]:
        """The session's rows, oldest first."""
        return [entry >> _SHIFT for entry in self.entries]

    @property
    def kinds(self) -> dict[int, str]:
        """What the user last did to each session row."""
        return {entry >> _SHIFT: _kind(entry) for entry in self.entries}

    @property
    def interest_entries(self) -> list[int]:
        """The interest's entries (row << 3 | type code), oldest first."""
        return list(map(int, self.interest[::2])) if self.interest else []

    @property
    def interest_rows(self) -> list[int]:
        """The rows of the interest, oldest first."""
        return [entry >> _SHIFT for entry in self.interest_entries]

    def touch(self, row: int, kind: str, ts: float, consuming: bool, session_items: int) -> None:
        """Count an event on ``row``; a consuming one (purchase, rating) ends the interest in it."""
        self.events += 1
        self.last_ts = max(self.last_ts, ts)
        self.entries.append(row << _SHIFT | _CODE.get(kind, _CODE["view"]))
        if len(self.entries) > session_items:
            del self.entries[0]
        if consuming:
            if isinstance(self.consumed, frozenset):
                self.consumed = set()
            self.consumed.add(row)
            self.drop_interest(row)

    def buy(self, row: int) -> bool:
        """Count a purchase of ``row``; whether the user had bought it before."""
        if self.bought is None:
            self.bought = array("i")
        for at, entry in enumerate(self.bought):
            if entry >> 8 == row:
                self.bought[at] = entry if entry & 0xFF == 0xFF else entry + 1
                return True
        self.bought.append(row << 8 | 1)
        return False

    def purchases(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows the user bought and how often."""
        if not self.bought:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        entries = np.frombuffer(self.bought, dtype=np.int32).astype(np.int64)
        return entries >> 8, entries & 0xFF

    def remember(
        self, row: int, kind: str, weight: float, ts: float, half_life_s: float, memory: int
    ) -> None:
        """Add ``weight`` (of a ``kind`` event) to the decayed interest in ``row``; keep the
        ``memory`` newest rows."""
        level = math.log2(max(weight, _TINY)) + ts / half_life_s
        previous = self.drop_interest(row)
        if previous is not None:  # log2(2 ** previous + 2 ** level), without overflow
            high, low = max(previous, level), min(previous, level)
            level = high + math.log2(1.0 + 2.0 ** (low - high))
        if self.interest is None:
            self.interest = array("d")
        self.interest.extend((row << _SHIFT | _CODE.get(kind, 0), level))
        if len(self.interest) > 2 * memory:
            del self.interest[:2]

    def drop_interest(self, row: int) -> float | None:
        """Remove ``row`` from the interest; its level, or None if it had none."""
        if not self.interest:
            return None
        # An entry is row << 3 | a type code. A scan of the entries in Python beats numpy's
        # vectorised search up to the 100 a user keeps (0.3-3 µs against 3.5-5.5).
        low = float(row << _SHIFT)
        high = low + (1 << _SHIFT)
        for at, entry in enumerate(self.interest[::2]):
            if low <= entry < high:
                level = self.interest[2 * at + 1]
                del self.interest[2 * at : 2 * at + 2]
                return level
        return None

    def interest_scores(self, weight: float, half_life_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The touched rows and ``weight`` x their interest decayed to the user's last event."""
        if not self.interest:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        pairs = np.array(self.interest).reshape(-1, 2)
        touched = pairs[:, 0].astype(np.int64) >> _SHIFT
        return touched, weight * np.exp2(pairs[:, 1] - self.last_ts / half_life_s)

    def history(self, listed: np.ndarray) -> History:
        """What an explanation of the rows ``listed`` reads of this user."""
        wanted = set(listed.tolist())
        own = {}  # the type of each listed row's last event, among the interest's
        for entry in self.interest_entries:
            row = entry >> _SHIFT
            if row in wanted:
                own[row] = _kind(entry)
        return History(
            rows=np.array(list(dict.fromkeys(reversed(self.session))), dtype=np.int64),
            kinds=self.kinds,
            own=own,
        )

    def to_json(self) -> list[Any]:
        """The JSON form (rows are this worker's numbering: see ``rows``)."""
        return [
            self.events,
            self.last_ts,
            sorted(self.consumed),
            [[entry >> _SHIFT, level, _kind(entry)] for entry, level in _pairs(self.interest)],
            self.session,
            [[row, kind] for row, kind in self.kinds.items()],
            [[entry >> 8, entry & 0xFF] for entry in self.bought or ()],
        ]

    def rows(self) -> set[int]:
        """Every row the JSON form names."""
        return {*self.consumed, *self.interest_rows, *self.session, *(e >> 8 for e in self.bought or ())}

    @classmethod
    def from_json(
        cls, data: list[Any], session_items: int, half_life_s: float, row_of: Callable[[int], int] = int
    ) -> UserState:
        """Read :meth:`to_json`; ``row_of`` turns a written row into this worker's."""
        events, last_ts, consumed, interest, session, kinds = data[:6]
        bought = data[6] if len(data) > 6 else []  # before 2026-12-01 (evening): not kept
        kind_of = {row: kind for row, kind in kinds}
        state = cls(events, last_ts, {row_of(key) for key in consumed} if consumed else _NOTHING)
        for row in session[-session_items:]:
            state.entries.append(row_of(row) << _SHIFT | _CODE.get(kind_of.get(row, "view"), 0))
        if interest:
            # [row, level, kind]; before 2026-12-02 [row, level] (the kind was the session's);
            # before 2026-12-01 [row, weight, seen]
            state.interest = array("d")
            for entry in interest:
                row = entry[0]
                if len(entry) == 3 and isinstance(entry[2], str):
                    level, kind = entry[1], entry[2]
                elif len(entry) == 3:
                    level, kind = (
                        math.log2(max(entry[1], _TINY)) + entry[2] / half_life_s,
                        kind_of.get(row, "view"),
                    )
                else:
                    level, kind = entry[1], kind_of.get(row, "view")
                state.interest.extend((row_of(row) << _SHIFT | _CODE.get(kind, 0), level))
        if bought:  # [row, count]; written for a few hours on 2026-12-01 [row, count, last time]
            state.bought = array("i", [row_of(row) << 8 | count for row, count, *_ in bought])
        return state
