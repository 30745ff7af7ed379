"""Apply a micro-batch of events: learn each, then re-rank every touched user once.

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

from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from online_models.recommender import Recommender, TopN, is_positive


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


class HitRate:
    """Share of recent positive events whose item was already in the user's served list."""

    def __init__(self, window: int) -> None:
        self._hits: deque[bool] = deque(maxlen=window)

    def observe(self, hit: bool) -> None:
        self._hits.append(hit)

    @property
    def value(self) -> float:
        return sum(self._hits) / len(self._hits) if self._hits else 0.0


class RefreshPipeline:
    """Recommender + the lists it last served; one ``process`` call per micro-batch."""

    def __init__(self, recommender: Recommender, hit_rate_window: int = 1000) -> None:
        self.recommender = recommender
        self.hit_rate = HitRate(hit_rate_window)
        # The item rows of each user's last list, as int32 bytes (113 bytes for 20 items; a tuple of
        # ids took 216, a frozenset ~2.2 kB).
        self._served: dict[str, bytes] = {}

    def learn(self, events: Iterable[Interaction]) -> list[str]:
        """Test-then-train each event; return the touched users, first-touched first."""
        touched: dict[str, None] = {}
        for ev in events:
            if is_positive(ev.type, ev.rating):
                served = self._served.get(ev.user_id)
                row = self.recommender.items.find(ev.item_id)
                self.hit_rate.observe(
                    served is not None and row is not None and row in memoryview(served).cast("i")
                )
            self.recommender.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
            touched[ev.user_id] = None
        return list(touched)

    def refresh(self, users: Sequence[str]) -> list[TopN]:
        """Re-rank the given users and remember what they were served."""
        lists = [self.recommender.recommend(user, explain=True) for user in users]
        row = self.recommender.items.row
        for top in lists:
            self._served[top.user_id] = array("i", map(row, top.items)).tobytes()
        return lists

    def process(self, events: Iterable[Interaction]) -> list[TopN]:
        return self.refresh(self.learn(events))

    def drop_users(self, users: Sequence[str]) -> None:
        """Let these users go (their partition moved to another worker): model and served lists."""
        for user in users:
            self._served.pop(user, None)
        self.recommender.users.drop(users)

    def forget(self, user: str) -> bool:
        """Erase the user from the model and the served lists; False if they were unknown."""
        served = self._served.pop(user, None) is not None
        return self.recommender.forget(user) or served
