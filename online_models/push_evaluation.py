"""Push policies replayed on a log's own clock (``pushrec evaluate --push``).

One model learns the log in time order; two policies push from its lists as they stand:

- ``product``: the push policy (``online_models.push_policy``): a shopper is considered when they
  have left, their abandoned cart once it is abandoned; a push must clear ``min_score`` and the
  recent bar; a decided push is held until its send time and not sent if the shopper comes back
  first; a budget that follows their activity.
- ``naive``: the top item of the list at every refresh (every event), as soon as it is ranked,
  under the same cap and dedupe window.

A push is judged a hit when the shopper engages with its item (click, add_to_cart, purchase,
rating >= 4; views too on a log of views only) within ``window_s`` after it was sent. Pushes sent
less than ``window_s`` before the log ends are counted but not judged.

>>> from types import SimpleNamespace as Ev
>>> from online_models.baselines import PopularityRanker
>>> day = 86_400.0
>>> log = [Ev(user_id=u, item_id=i, type="click", ts=t, rating=None) for u, i, t in
...        [("a", "x", 0.0), ("b", "y", 10.0), ("b", "x", 20.0), ("a", "y", 3 * day), ("b", "z", 4 * day)]]
>>> report = evaluate_push(log, PopularityRanker(), PushPolicy(learn_send_time=False))
>>> report["policies"]["naive"]["pushes"], report["policies"]["product"]["pushes"]
(5, 3)
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from online_models.evaluation import Ranker
from online_models.pipeline import Interaction
from online_models.push_policy import (
    CAPPED,
    CART,
    DAY_S,
    REFRESH,
    SENT,
    Activity,
    Candidate,
    PushPolicy,
    RecentScores,
    hour_of_week,
)
from online_models.recommender import POPULAR_REASON, is_positive

_AWAY, _CART, _SEND = 0, 1, 2  # timer kinds, in the order they fire at the same instant


@dataclass
class _Push:
    user: str
    item: str
    trigger: str
    decided: float
    sent: float = math.nan


@dataclass
class _Tally:
    """One policy's pushes and per-user memory (push times, item -> last push)."""

    pushes: list[_Push] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    last_pushed: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, push: _Push, at: float) -> None:
        push.sent = at
        self.pushes.append(push)
        self.times[push.user].append(at)
        self.last_pushed[push.user][push.item] = at


def evaluate_push(
    events: Iterable[Interaction],
    model: Ranker,
    policy: PushPolicy,
    n: int = 20,
    window_s: float = DAY_S,
    dataset: str = "",
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Replay ``events`` through ``model`` and both policies; the report of SPEC's ``--push``.
    ``n``: the list length the policies choose from."""
    log = list(events)
    views_only = all(ev.type == "view" for ev in log)
    engaged: dict[tuple[str, str], list[float]] = defaultdict(list)
    shopper_days: set[tuple[str, int]] = set()
    for ev in log:
        shopper_days.add((ev.user_id, int(ev.ts // DAY_S)))
        if is_positive(ev.type, ev.rating) and (ev.type != "view" or views_only):
            engaged[ev.user_id, ev.item_id].append(ev.ts)
    product, naive = _Tally(), _Tally()
    naive_policy = replace(policy, min_score=-math.inf)
    recent = RecentScores(policy.score_window)  # the product policy's recent bar
    activity: dict[str, Activity] = {}
    common: dict[int, float] = defaultdict(float)  # every shopper's visit-start hours
    timers: list[tuple[float, int, int, str, Any]] = []  # (due, kind, seq, user, payload)
    seq = 0
    latest: dict[tuple[str, int], int] = {}  # (user, away or cart) -> the timer that counts

    explains = _takes(model, "explain")
    timed = _takes(model, "now")

    def ranked(user: str, now: float) -> tuple[list[str], list[float], list[str]]:
        """The list the sender reads at ``now`` (the product model's: ranked as the worker ranks it
        once the shopper has left, which the sender waits for)."""
        options: dict[str, Any] = {"explain": True} if explains else {}
        if timed:
            options["now"] = now
        top = model.recommend(user, n, **options)
        reasons = top.reasons or [POPULAR_REASON] * len(top.items)
        return top.items, top.scores, reasons

    def consider(user: str, now: float, when_away: bool) -> None:
        nonlocal seq
        items, scores, reasons = ranked(user, now)
        candidates = policy.candidates(when_away, items, scores, reasons)
        if not when_away and not candidates:
            return  # no abandoned cart: nothing to decide
        state = activity[user]
        decision = policy.choose(
            candidates,
            now,
            product.times[user],
            product.last_pushed[user],
            policy.budget(state.recent_visits(now)),
            recent.bar(policy.min_score_quantile),
        )
        recent.note(decision)
        product.outcomes[decision.outcome] += 1
        if decision.outcome != SENT or decision.item is None or decision.trigger is None:
            return
        push = _Push(user, decision.item, decision.trigger, now)
        send_at = policy.send_time(now, state.hours, common)
        if send_at <= now:
            product.record(push, now)
        else:
            seq += 1
            heapq.heappush(timers, (send_at, _SEND, seq, user, push))

    def fire(until: float) -> None:
        while timers and timers[0][0] <= until:
            due, kind, number, user, payload = heapq.heappop(timers)
            state = activity[user]
            if kind == _SEND:
                if state.last > payload.decided:  # came back before it was sent
                    product.outcomes["active"] += 1
                else:
                    product.record(payload, due)
            elif latest[user, kind] == number:  # no event since it was set: the shopper has left
                consider(user, due, when_away=kind == _AWAY)

    for ev in log:
        fire(ev.ts)
        model.learn_one(ev.user_id, ev.item_id, ev.type, ev.ts, ev.rating)
        state = activity.setdefault(ev.user_id, Activity())
        if state.seen(ev.ts, policy.away_after_s):
            common[hour_of_week(ev.ts)] += 1.0
        for kind, after in ((_AWAY, policy.away_after_s), (_CART, policy.cart_after_s)):
            if kind == _AWAY or CART in policy.triggers:
                seq += 1
                latest[ev.user_id, kind] = seq
                heapq.heappush(timers, (ev.ts + after, kind, seq, ev.user_id, None))
        _naive(naive, naive_policy, ev, model, n)
        if progress is not None:
            progress()
    if log:
        fire(log[-1].ts)
    end = log[-1].ts if log else 0.0
    users = len({ev.user_id for ev in log})
    return {
        "dataset": dataset,
        "events": len(log),
        "users": users,
        "shopper_days": len(shopper_days),
        "window_s": window_s,
        "policies": {
            name: _summary(tally, engaged, end, window_s, users, len(shopper_days))
            for name, tally in (("product", product), ("naive", naive))
        },
    }


def _naive(tally: _Tally, policy: PushPolicy, ev: Interaction, model: Ranker, n: int) -> None:
    """The first item of the refreshed list not pushed within the dedupe window, now, under the
    fixed cap (the push sender before the push policy); ``policy`` has no threshold."""
    user, now = ev.user_id, ev.ts
    if policy.capped(now, tally.times[user]):  # before ranking: most refreshes are capped
        tally.outcomes[CAPPED] += 1
        return
    top = model.recommend(user, n)
    decision = policy.choose(
        [Candidate(item, score, REFRESH) for item, score in zip(top.items, top.scores, strict=True)],
        now,
        tally.times[user],
        tally.last_pushed[user],
    )
    tally.outcomes[decision.outcome] += 1
    if decision.item is not None:
        tally.record(_Push(user, decision.item, REFRESH, now), now)


def _summary(
    tally: _Tally,
    engaged: dict[tuple[str, str], list[float]],
    end: float,
    window_s: float,
    users: int,
    shopper_days: int,
) -> dict[str, Any]:
    by_trigger: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # pushes, judged, hits
    for push in tally.pushes:
        counts = by_trigger[push.trigger]
        counts[0] += 1
        if push.sent + window_s > end:
            continue
        counts[1] += 1
        times = engaged.get((push.user, push.item), ())
        k = bisect_right(times, push.sent)  # the first engagement after the send
        counts[2] += k < len(times) and times[k] <= push.sent + window_s
    pushes, judged, hits = (sum(c[i] for c in by_trigger.values()) for i in range(3))
    return {
        "precision": hits / judged if judged else 0.0,
        "pushes_per_user_day": pushes / shopper_days if shopper_days else 0.0,
        "reach": len({p.user for p in tally.pushes}) / users if users else 0.0,
        "pushes": pushes,
        "judged": judged,
        "hits": hits,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "by_trigger": {
            trigger: {"pushes": c[0], "judged": c[1], "precision": c[2] / c[1] if c[1] else 0.0}
            for trigger, c in sorted(by_trigger.items())
        },
    }


def _takes(model: object, option: str) -> bool:
    """Whether ``model.recommend`` takes ``option`` (the product model's ``explain``, ``now``)."""
    import inspect

    return option in inspect.signature(model.recommend).parameters  # type: ignore[attr-defined]
