"""Apply a micro-batch of events: learn each, then re-rank every touched user once, and every
shopper who has left since (quiet for the model's ``visit_gap_s`` of stream time: their list is
re-ranked once more, as the list of a shopper away, ``TopN.away``).

The Faust worker and the in-process replay both drive this one class, so the transport cannot
change the answer.

>>> from types import SimpleNamespace as Ev
>>> pipe = RefreshPipeline(Recommender(n_factors=4, seed=0, top_n=3))
>>> batch = [Ev(user_id="u1", item_id="a", type="click", ts=1.0, rating=None),
...          Ev(user_id="u1", item_id="b", type="purchase", ts=2.0, rating=None)]
>>> [(t.user_id, t.items) for t in pipe.process(batch)]
[('u1', ['a'])]
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from online_models.recommender import PUSH_ANSWERS, Recommender, TopN, is_positive


class Interaction(Protocol):
    """What the pipeline reads from an event (``stream.events.Event`` has it)."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def rating(self) -> float | None: ...


_SWEEP_EVERY = 4096  # events between sweeps for ended visits
# Users a round ranks at a time when every item is scored (~8 ms on a 2-core machine at
# taobao's 35k items), so that its first lists can be written while the rest are ranked.
RANK_CHUNK_USERS = 32


class HitRate:
    """Share of recent positive events whose item was already in the user's served list."""

    def __init__(self, window: int) -> None:
        self._hits: deque[bool] = deque(maxlen=window)

    def observe(self, hit: bool) -> None:
        self._hits.append(hit)

    @property
    def value(self) -> float:
        return sum(self._hits) / len(self._hits) if self._hits else 0.0


class VisitHitRate(HitRate):
    """Share of recent visits in which the shopper engaged with an item of the list they had
    been served when the visit began: the live twin of ``evaluate --protocol next-session`` (a
    push is read at the next visit). A visit begins after more than ``gap_s`` (event time)
    without an event of the shopper; their first is not judged (nothing was served before it),
    nor is a visit without an engagement (click, add-to-cart, purchase, rating >= 4; views too
    while the worker has seen nothing but views)."""

    def __init__(self, window: int, gap_s: float = 1800.0) -> None:
        super().__init__(window)
        self.gap_s = gap_s
        # Shoppers in a visit not judged yet: the list served when it began, whether they have
        # engaged during it, their last event time. Closed by a hit, their next visit, or a sweep.
        self._open: dict[str, tuple[bytes, bool, float]] = {}
        self.views_only = True  # while every event seen is a view, views count as engagement
        self._latest = -math.inf
        self._until_sweep = _SWEEP_EVERY

    def observe_event(
        self,
        user: str,
        kind: str,
        positive: bool,
        ts: float,
        previous_ts: float | None,
        served: bytes,
        row: int | None,
    ) -> None:
        """An event of ``user`` (before it is learned) who was served ``served``: ``previous_ts``
        is their last event's time (None: their first), ``row`` the item's row (None: unknown,
        or not a positive event). The caller clears :attr:`views_only` at the first event that
        is not a view."""
        self._latest = max(self._latest, ts)
        entry = self._open.get(user)
        if previous_ts is not None and ts - previous_ts > self.gap_s:  # a new visit
            if entry is not None and entry[1]:
                self._hits.append(False)  # the last one ended engaged, without a hit
            entry = (served, False, ts)
        if entry is None:  # not in a visit that can be judged
            return
        if positive and (kind != "view" or self.views_only):
            if row is not None and row in memoryview(entry[0]).cast("i"):
                self._hits.append(True)
                self._open.pop(user, None)
                return
            self._open[user] = (entry[0], True, ts)
        else:
            self._open[user] = (entry[0], entry[1], ts)
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._sweep()

    def _sweep(self) -> None:
        """Close the visits that ended (their shopper quiet for more than the gap)."""
        self._until_sweep = _SWEEP_EVERY
        for user, (_, engaged, last) in list(self._open.items()):
            if self._latest - last > self.gap_s:
                if engaged:
                    self._hits.append(False)
                del self._open[user]

    def drop(self, user: str) -> None:
        self._open.pop(user, None)


class RefreshPipeline:
    """Recommender + the lists it last served; one ``process`` call per micro-batch."""

    def __init__(self, recommender: Recommender, hit_rate_window: int = 1000) -> None:
        self.recommender = recommender
        self.hit_rate = HitRate(hit_rate_window)
        self.visit_hit_rate = VisitHitRate(hit_rate_window, recommender.visit_gap_s)
        # The item rows of each user's last list, as int32 bytes (113 bytes for 20 items; a tuple of
        # ids took 216, a frozenset ~2.2 kB).
        self._served: dict[str, bytes] = {}
        # Shoppers whose last list was ranked while they were in a visit -> the key of their entry
        # in a heap of (a time at or before their last event, shopper), moved on when it comes up
        # and they have had an event since. An entry whose key is not its shopper's here is left
        # over (they were let go, then followed again) and is dropped when it comes up.
        self._visiting: dict[str, float] = {}
        self._by_last: list[tuple[float, str]] = []

    def learn(self, events: Iterable[Interaction]) -> list[str]:
        """Test-then-train each event; return the touched users, first-touched first."""
        touched: dict[str, None] = {}
        users, find, visits = self.recommender.users, self.recommender.items.find, self.visit_hit_rate
        for ev in events:
            if ev.type in PUSH_ANSWERS:  # an answer to a push, not a visit: learned only
                self.recommender.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
                touched[ev.user_id] = None
                continue
            served = self._served.get(ev.user_id)
            positive = is_positive(ev.type, ev.rating)
            row = find(ev.item_id) if positive else None
            if positive:
                self.hit_rate.observe(
                    served is not None and row is not None and row in memoryview(served).cast("i")
                )
            if ev.type != "view":
                visits.views_only = False
            if served is not None:  # else no visit of theirs can be judged (nothing was served)
                state = users.get(ev.user_id)
                previous = state.last_ts if state is not None else None
                visits.observe_event(ev.user_id, ev.type, positive, ev.ts, previous, served, row)
            self.recommender.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
            touched[ev.user_id] = None
        self.follow(touched)
        return list(touched)

    def leaving(self) -> list[str]:
        """The shoppers who have left since the last call (quiet for ``visit_gap_s`` on the
        stream's clock), whose list must be ranked again as theirs away."""
        recommender, heap, visiting, left = self.recommender, self._by_last, self._visiting, []
        horizon = recommender.clock - recommender.visit_gap_s  # (is_away: last_ts <= horizon)
        while heap and heap[0][0] <= horizon:
            key, user = heapq.heappop(heap)
            if visiting.get(user) != key:  # left over, or they left already
                continue
            state = recommender.users.get(user)
            if state is None:  # dropped or forgotten
                del visiting[user]
                continue
            if state.last_ts > horizon:  # an event since: not gone yet
                visiting[user] = state.last_ts
                heapq.heappush(heap, (state.last_ts, user))
                continue
            del visiting[user]
            left.append(user)
        return left

    def advance(self, clock: float) -> list[str]:
        """Move the stream's clock on to ``clock`` (time passed without an event to say so) and
        name the shoppers who have left by then, as :meth:`leaving`."""
        self.recommender.clock = max(self.recommender.clock, clock)
        return self.leaving()

    def follow(self, users: Iterable[str]) -> None:
        """Follow these users (touched by :meth:`learn`, or restored from a checkpoint) until they
        leave, if they are in a visit on the model's clock."""
        recommender = self.recommender
        for user in users:
            state = recommender.users.get(user)
            if state is not None and not recommender.is_away(state):
                if user not in self._visiting:
                    self._visiting[user] = state.last_ts
                    heapq.heappush(self._by_last, (state.last_ts, user))
            else:
                self._visiting.pop(user, None)

    def chunks(self, users: Sequence[str]) -> list[Sequence[str]]:
        """``users`` in the chunks a round re-ranks them in (:meth:`refresh` each), in order:
        ``RANK_CHUNK_USERS`` at a time; all at once where the approximate index ranks them, whose
        one search serves the whole round (at a million items 1.1 ms a user in rounds of ~130,
        2.6 ms in chunks of 32)."""
        size = len(users) if self.recommender.candidates.applies else RANK_CHUNK_USERS
        return [users[at : at + size] for at in range(0, len(users), max(size, 1))]

    def refresh(self, users: Sequence[str]) -> list[TopN]:
        """Re-rank the given users and remember what they were served."""
        lists = self.recommender.recommend_many(users, explain=True)
        row = self.recommender.items.row
        for top in lists:
            self._served[top.user_id] = array("i", map(row, top.items)).tobytes()
        return lists

    def process(self, events: Iterable[Interaction]) -> list[TopN]:
        """Learn ``events``, then re-rank the touched users and those who have left meanwhile."""
        touched = self.learn(events)
        return self.refresh(list(dict.fromkeys([*touched, *self.leaving()])))

    def drop_users(self, users: Sequence[str]) -> None:
        """Let these users go (their partition moved to another worker): model and served lists."""
        for user in users:
            self._served.pop(user, None)
            self._visiting.pop(user, None)
            self.visit_hit_rate.drop(user)
        self.recommender.users.drop(users)

    def forget(self, user: str) -> bool:
        """Erase the user from the model and the served lists; False if they were unknown."""
        served = self._served.pop(user, None) is not None
        self._visiting.pop(user, None)
        self.visit_hit_rate.drop(user)
        return self.recommender.forget(user) or served
