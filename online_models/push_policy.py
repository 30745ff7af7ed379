"""The push policy: when a shopper gets a push, with which item, and when it is sent.

A push is considered when a shopper has gone quiet (no event for ``away_after_s``: the ``away``
trigger with an item new to them, ``browse`` with one they looked at, ``replenishment`` with one
they buy again), or when an item has sat in their cart ``cart_after_s`` since they left
(``cart``); never while they are active. The policy
picks the best-scored item of the trigger's candidates that was not pushed to them within the
dedupe window and whose score clears ``min_score`` and the recent bar (``min_score_quantile``
of the scores of the last ``score_window`` pushes that cleared ``min_score``:
:class:`RecentScores`), within a budget of pushes per window that
follows the shopper's activity (``budget``: one a window for a rare visitor, more for a frequent
one, never more than ``max_per_window``). A decided push is held until the hour of the next day
the shopper is usually active (``send_time``) and out of the quiet hours. A catalogue price that
falls by ``price_drop_min_share`` or more is pushed (``price_drop``) to the shoppers who looked
at or carted the item and have it on their list, once they are not active (it is news: it meets
``min_score`` only, not the recent bar).

The same pure code decides in the push sender (state in Redis) and in ``pushrec evaluate --push``
(state in memory, on the log's clock).

>>> policy = PushPolicy(max_per_window=1, cap_window_s=3600, dedupe_window_s=86400)
>>> policy.choose([Candidate("a", 2.0), Candidate("b", 1.0)], now=100.0, recent_pushes=[],
...               last_pushed={"a": 50.0}, budget=1)
Decision(outcome='sent', item='b', score=1.0, trigger='away')
>>> policy.choose([Candidate("a", 2.0)], now=100.0, recent_pushes=[90.0], last_pushed={}, budget=1)
Decision(outcome='capped', item=None, score=None, trigger=None)
>>> policy.send_time(0.0, {}, {}) == policy.send_time(0.0, {}, {}) == 0.0   # nothing known: now
True
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from online_models.explain import CART as CART_KIND
from online_models.explain import NEW, OWN, RESTOCK_KIND, reason_kind

# Outcomes of a decision (labels of pushrec_pushes_total); the sender adds delivery outcomes.
SENT, CAPPED, DEDUPED, QUIET_HOURS = "sent", "capped", "deduped", "quiet_hours"
BELOW_THRESHOLD = "below_threshold"  # nothing new to the shopper scored min_score or more
BELOW_RECENT = "below_recent"  # cleared min_score, but under the recent pushes' bar (RecentScores)
ACTIVE = "active"  # the shopper came back before the held push was due: not sent
HOLDOUT = "holdout"  # would have been sent, to a shopper of the control group: never sent
# Triggers (label values, and the notification's "trigger").
AWAY, BROWSE, CART, REPLENISHMENT = "away", "browse", "cart", "replenishment"
PRICE_DROP = "price_drop"  # an item the shopper looked at or carted is cheaper now
TRIGGERS = (AWAY, BROWSE, CART, REPLENISHMENT, PRICE_DROP)
REFRESH = "refresh"  # the naive policy's: a push for every refreshed list

HOUR_S, DAY_S, WEEK_S = 3600.0, 86_400.0, 7 * 86_400.0
HOURS_OF_WEEK = 168


def hour_of_week(ts: float) -> int:
    """0 = Thursday 00:00-01:00 UTC (the epoch's weekday): only differences matter."""
    return int(ts // HOUR_S) % HOURS_OF_WEEK


def in_holdout(user: str, share: float, salt: str) -> bool:
    """Whether ``user`` is in the control group that never gets a push: a hash of the salt and the
    user id alone, so the same in every sender, after every restart, and in every report.

    >>> [in_holdout(u, 0.5, "s") for u in ("ann", "bob", "cy")], in_holdout("cy", 0.0, "s")
    ([False, False, True], False)
    """
    digest = hashlib.blake2b(f"{salt}\0{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2.0**64


@dataclass(frozen=True, slots=True)
class Candidate:
    item: str
    score: float
    trigger: str = AWAY


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str
    item: str | None
    score: float | None = None
    trigger: str | None = None


@dataclass(frozen=True, slots=True)
class PushPolicy:
    """Budget, per-item dedupe window, relevance threshold, send time and quiet hours (UTC)."""

    max_per_window: int = 3
    cap_window_s: float = DAY_S
    dedupe_window_s: float = 7 * DAY_S
    quiet_start_hour: int | None = None
    quiet_end_hour: int | None = None
    min_score: float = -math.inf  # relevance threshold (in the model's blended score)
    # and the recent bar: a push must score at least this quantile of the last score_window
    # pushes that cleared min_score (0: no bar)
    min_score_quantile: float = 0.0
    score_window: int = 1000
    visits_per_push: float = 7.0  # a shopper's budget: one more push a window per this many recent visits
    send_hour_min_visits: int = 3  # fewer visits known: the shoppers' common hour instead
    away_after_s: float = 1800.0  # a shopper this long without an event has left
    cart_after_s: float = 4 * HOUR_S  # a cart left this long after the last event is abandoned
    triggers: frozenset[str] = frozenset(TRIGGERS)  # those switched on
    learn_send_time: bool = True  # False: send as soon as decided (out of the quiet hours)
    price_drop_min_share: float = 0.05  # a price drop smaller than this share of the old price is no news

    def candidates(
        self, when_away: bool, items: Sequence[str], scores: Sequence[float], reasons: Sequence[str]
    ) -> list[Candidate]:
        """A shopper's listed items that a trigger switched on may push: when they have just
        left (``when_away``), items new to them (``away``) and ones they buy again
        (``replenishment``); once their cart is abandoned, what is in it (``cart``)."""
        wanted = {NEW: AWAY, OWN: BROWSE, RESTOCK_KIND: REPLENISHMENT} if when_away else {CART_KIND: CART}
        out = []
        for item, score, reason in zip(items, scores, reasons, strict=True):
            trigger = wanted.get(reason_kind(reason))
            if trigger in self.triggers:
                out.append(Candidate(item, score, trigger))
        return out

    def watched(self, items: Sequence[str], reasons: Sequence[str]) -> list[str]:
        """The listed items the shopper engaged with (looked at, carted): a drop in their price
        is worth a push (``price_drop``). None when that trigger is off.

        >>> PushPolicy().watched(["a", "b", "c"], ["you viewed it", "popular", "it is in your cart"])
        ['a', 'c']
        """
        if PRICE_DROP not in self.triggers:
            return []
        return [i for i, r in zip(items, reasons, strict=True) if reason_kind(r) in (OWN, CART_KIND)]

    def price_dropped(self, old: float, new: float) -> bool:
        """Whether a price change is a drop worth a push (by ``price_drop_min_share`` at least).

        >>> PushPolicy().price_dropped(100.0, 90.0), PushPolicy().price_dropped(100.0, 97.0)
        (True, False)
        """
        return PRICE_DROP in self.triggers and old > 0 and new <= old * (1 - self.price_drop_min_share)

    def budget(self, recent_visits: float) -> int:
        """Pushes this shopper may get per cap window: one, plus one per ``visits_per_push``
        recent visits (:meth:`Activity.recent_visits`: a daily visitor has ~10.6), up to
        ``max_per_window``."""
        return min(self.max_per_window, 1 + int(recent_visits // self.visits_per_push))

    def choose(
        self,
        candidates: Sequence[Candidate],
        now: float,
        recent_pushes: Sequence[float],
        last_pushed: Mapping[str, float],
        budget: int | None = None,
        bar: float = -math.inf,
    ) -> Decision:
        """The push for these candidates (best first), or why none: ``recent_pushes`` are the
        shopper's push times, ``last_pushed`` item -> last push time, ``budget`` the pushes
        allowed per cap window (default ``max_per_window``), ``bar`` the recent pushes' bar
        (:meth:`RecentScores.bar`; a price drop is news and meets ``min_score`` only).

        >>> PushPolicy(min_score=40).choose([Candidate("a", 50.0)], 0.0, [], {}, bar=60.0)
        Decision(outcome='below_recent', item=None, score=50.0, trigger='away')
        """
        if self.capped(now, recent_pushes, budget):
            return Decision(CAPPED, None)
        fresh = [c for c in candidates if now - last_pushed.get(c.item, -math.inf) >= self.dedupe_window_s]
        if not fresh:
            return Decision(DEDUPED, None)
        best = max(fresh, key=lambda c: c.score)
        if best.score < self.min_score:
            return Decision(BELOW_THRESHOLD, None)
        if best.score < bar and best.trigger != PRICE_DROP:
            return Decision(BELOW_RECENT, None, best.score, best.trigger)
        return Decision(SENT, best.item, best.score, best.trigger)

    @property
    def version(self) -> str:
        """A short name of these settings, carried by every exposure record (a change of policy
        shows in the report)."""
        settings = [
            (f.name, sorted(value) if isinstance(value, frozenset) else value)
            for f in fields(self)
            for value in [getattr(self, f.name)]
        ]  # a frozenset's order changes between processes (string hashing is salted)
        return "p" + hashlib.blake2b(repr(settings).encode(), digest_size=4).hexdigest()

    def capped(self, now: float, recent_pushes: Sequence[float], budget: int | None = None) -> bool:
        """Whether the shopper had ``budget`` pushes (at most ``max_per_window``) in the cap window."""
        allowed = self.max_per_window if budget is None else min(budget, self.max_per_window)
        return sum(1 for t in recent_pushes if now - t < self.cap_window_s) >= allowed

    def in_quiet_hours(self, now: float) -> bool:
        start, end = self.quiet_start_hour, self.quiet_end_hour
        if start is None or end is None or start == end:
            return False
        hour = time.gmtime(now).tm_hour
        return start <= hour < end if start < end else hour >= start or hour < end

    def after_quiet_hours(self, at: float) -> float:
        """``at``, or the end of the quiet hours it falls in."""
        while self.in_quiet_hours(at):
            at = (at // HOUR_S + 1) * HOUR_S
        return at

    def send_time(self, now: float, hours: Mapping[int, float], common: Mapping[int, float]) -> float:
        """When to send a push decided at ``now``: the start of the hour, within the next day,
        in which this shopper's visits began most often (``hours``: hour of week -> visits; the
        shoppers' ``common`` hours when they have fewer than ``send_hour_min_visits``); now if
        that hour is the current one, nothing is known or ``learn_send_time`` is off; never in
        the quiet hours."""
        if not self.learn_send_time:
            return self.after_quiet_hours(now)
        counts = hours if sum(hours.values()) >= self.send_hour_min_visits else common
        best, best_count = 0, 0.0
        for ahead in range(24):  # ties go to the soonest
            count = counts.get(hour_of_week(now + ahead * HOUR_S), 0.0)
            if count > best_count:
                best, best_count = ahead, count
        at = now if best == 0 else (now // HOUR_S + best) * HOUR_S
        return self.after_quiet_hours(at)


class RecentScores:
    """The scores of the last ``size`` pushes that cleared ``min_score`` (sent or not), and the
    bar a push must clear among them: a threshold that follows the shop's own scores, so the
    policy sends the better share of its chances whatever the scale of the model's scores.

    >>> recent = RecentScores(size=4, min_count=2)
    >>> recent.bar(0.5)  # too few scores known: no bar
    -inf
    >>> for score in (10.0, 20.0, 30.0, 40.0, 50.0):
    ...     recent.add(score)
    >>> recent.bar(0.5), recent.bar(0.0)  # the last four: 20, 30, 40, 50
    (35.0, -inf)
    """

    def __init__(self, size: int = 1000, min_count: int | None = None) -> None:
        self.scores: deque[float] = deque(maxlen=size)
        self.min_count = max(1, size // 20) if min_count is None else min_count
        self._bar: tuple[float, float] | None = None  # (quantile, bar) until the next change

    def add(self, score: float) -> None:
        self.scores.append(score)
        self._bar = None

    def note(self, decision: Decision) -> float | None:
        """Count ``decision``'s score if its best candidate cleared ``min_score`` (sent or held
        back by the bar; a price drop's never counts). The score counted, or None."""
        if decision.outcome not in (SENT, BELOW_RECENT) or decision.trigger == PRICE_DROP:
            return None
        assert decision.score is not None  # both outcomes carry it
        self.add(decision.score)
        return decision.score

    def replace(self, scores: Iterable[float]) -> None:
        """Start again from these scores, oldest first (a sender reading the group's)."""
        self.scores.clear()
        self.scores.extend(scores)
        self._bar = None

    def bar(self, quantile: float) -> float:
        """The ``quantile`` of the scores kept (-inf when off or fewer than ``min_count``)."""
        if quantile <= 0 or len(self.scores) < self.min_count:
            return -math.inf
        if self._bar is None or self._bar[0] != quantile:
            self._bar = (quantile, float(np.quantile(np.fromiter(self.scores, float), quantile)))
        return self._bar[1]


@dataclass(slots=True)
class Activity:
    """What the policy knows of a shopper's habits: when they were last active, how many visits
    they made lately (decayed with a half-life of a week), and the hours of week their visits
    began. A visit begins after ``away_after_s`` without an event.

    >>> a = Activity()
    >>> [a.seen(t, away_after_s=1800) for t in (0.0, 60.0, 7200.0)]
    [True, False, True]
    >>> round(a.visits, 3), a.hours
    (1.992, {0: 1.0, 2: 1.0})
    """

    last: float = -math.inf
    visits: float = 0.0
    hours: dict[int, float] = field(default_factory=dict)

    def seen(self, ts: float, away_after_s: float) -> bool:
        """Record an event at ``ts``; whether it began a visit."""
        new_visit = ts - self.last > away_after_s
        if new_visit:
            if self.last > -math.inf:
                self.visits *= 0.5 ** ((ts - self.last) / WEEK_S)
            self.visits += 1.0
            hour = hour_of_week(ts)
            self.hours[hour] = self.hours.get(hour, 0.0) + 1.0
        self.last = max(self.last, ts)
        return new_visit

    def recent_visits(self, now: float) -> float:
        """The visit count at ``now``, each visit weighing half as much a week later."""
        return self.visits * 0.5 ** (max(0.0, now - self.last) / WEEK_S) if self.visits else 0.0
