"""What pushes did: sends, opens, conversions, and the uplift against the holdout group, from the
exposure log and the events (``pushrec push-report``; the same attribution the sender counts live).

- A push is **opened** when a ``push_open`` event carries its push id (dismissed likewise).
- A push (or, for the holdout, a would-be push) **converts** when the shopper clicks, carts or
  buys its item within ``window_s`` after its delivery (would-be delivery).
- The **uplift** compares shoppers, not pushes: a shopper is treated (or held out) from their
  first sent (or would-be) push on, and their outcome is whether they engaged (click, cart,
  purchase of anything) within ``window_s`` after it, and how many purchases they made then.
  Treated minus holdout, with a 95 % confidence interval (normal approximation; Welch's for the
  purchases); ``conclusive`` when both groups are large enough for it and the interval of the
  engaged share excludes zero.

>>> from types import SimpleNamespace as Ev
>>> exposures = [
...     {"push_id": "p1", "user_id": "a", "item_id": "x", "trigger": "away", "decision": "sent",
...      "group": "treated", "decided_at": 0.0, "delivered_at": 10.0},
...     {"push_id": "p2", "user_id": "b", "item_id": "y", "trigger": "away", "decision": "holdout",
...      "group": "holdout", "decided_at": 0.0, "delivered_at": 10.0}]
>>> events = [Ev(type="push_open", user_id="a", item_id="x", ts=11.0, push_id="p1"),
...           Ev(type="purchase", user_id="a", item_id="x", ts=12.0, push_id=None),
...           Ev(type="click", user_id="b", item_id="z", ts=99.0, push_id=None)]
>>> report = push_report(exposures, events, window_s=3600.0)
>>> report["sent"], report["opens"], report["conversions"], report["holdout"]["conclusive"]
(1, 1, 1, False)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from online_models.push_policy import HOLDOUT, SENT
from online_models.recommender import DISMISS, OPEN

ENGAGING = ("click", "add_to_cart", "purchase")  # what converts a push, and makes a shopper engaged
MIN_GROUP = 30  # shoppers per group below which no interval is trusted
MIN_OUTCOMES = 5  # engaged and not engaged shoppers each group needs (normal approximation)
Z95 = 1.959963984540054


class EventLike(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def push_id(self) -> str | None: ...


@dataclass(slots=True)
class _Push:
    push_id: str
    user: str
    item: str
    trigger: str
    segment: str
    delivered_at: float
    holdout: bool


@dataclass(slots=True)
class _Cohort:
    """Shoppers of one slice (all, a trigger, a segment): when each was first (would-be) pushed."""

    first: dict[str, float] = field(default_factory=dict)
    holdout: set[str] = field(default_factory=set)
    engaged: set[str] = field(default_factory=set)
    purchases: Counter[str] = field(default_factory=Counter)

    def add(self, push: _Push) -> None:
        if push.delivered_at < self.first.get(push.user, math.inf):
            self.first[push.user] = push.delivered_at
        if push.holdout:
            self.holdout.add(push.user)


def converts(item: str, delivered_at: float, ev: EventLike, window_s: float) -> bool:
    """Whether ``ev`` converts a push of ``item`` delivered at ``delivered_at``: a click, cart or
    purchase of it within ``window_s`` after (the live count and the report both ask this)."""
    return ev.type in ENGAGING and ev.item_id == item and delivered_at <= ev.ts <= delivered_at + window_s


def latest(exposures: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The last record per push id (a crash can repeat one: the log is at least once)."""
    return {str(record["push_id"]): record for record in exposures}


def push_report(
    exposures: Iterable[Mapping[str, Any]],
    events: Iterable[EventLike],
    window_s: float = 86_400.0,
    since: float | None = None,
) -> dict[str, Any]:
    """The report (SPEC's push-report JSON) of the exposures decided at ``since`` or later."""
    records = [
        r for r in latest(exposures).values() if since is None or float(r.get("decided_at") or 0.0) >= since
    ]
    pushes = [
        _Push(
            str(r["push_id"]),
            str(r["user_id"]),
            str(r["item_id"]),
            str(r.get("trigger") or "?"),
            str(r.get("segment") or "none"),
            float(r["delivered_at"]),
            r["decision"] == HOLDOUT,
        )
        for r in records
        if r.get("decision") in (SENT, HOLDOUT) and r.get("delivered_at") is not None
    ]
    by_id = {p.push_id: p for p in pushes}
    by_user: dict[str, list[_Push]] = defaultdict(list)
    cohorts: dict[tuple[str, str], _Cohort] = defaultdict(_Cohort)
    for push in pushes:
        by_user[push.user].append(push)
        for key in (("all", ""), ("trigger", push.trigger), ("segment", push.segment)):
            cohorts[key].add(push)
    member_of: dict[str, list[_Cohort]] = defaultdict(list)
    for cohort in cohorts.values():
        for user in cohort.first:
            member_of[user].append(cohort)
    opened: set[str] = set()
    dismissed: set[str] = set()
    converted: set[str] = set()
    for ev in events:
        mine = by_user.get(ev.user_id)
        if mine is None:
            continue
        if ev.type in (OPEN, DISMISS):
            answered = by_id.get(ev.push_id or "")
            if answered is not None and not answered.holdout and answered.user == ev.user_id:
                (opened if ev.type == OPEN else dismissed).add(answered.push_id)
            continue
        if ev.type not in ENGAGING:
            continue
        for push in mine:
            if converts(push.item, push.delivered_at, ev, window_s):
                converted.add(push.push_id)
        for cohort in member_of[ev.user_id]:
            first = cohort.first[ev.user_id]
            if first <= ev.ts <= first + window_s:
                cohort.engaged.add(ev.user_id)
                if ev.type == "purchase":
                    cohort.purchases[ev.user_id] += 1

    def summary(selected: list[_Push], cohort: _Cohort) -> dict[str, Any]:
        sent = [p for p in selected if not p.holdout]
        held = [p for p in selected if p.holdout]
        opens = sum(p.push_id in opened for p in sent)
        conversions = sum(p.push_id in converted for p in sent)
        held_conversions = sum(p.push_id in converted for p in held)
        return {
            "sent": len(sent),
            "opens": opens,
            "open_rate": _ratio(opens, len(sent)),
            "dismissals": sum(p.push_id in dismissed for p in sent),
            "conversions": conversions,
            "conversions_per_1000": 1000.0 * _ratio(conversions, len(sent)),
            "holdout_pushes": len(held),
            "holdout_conversions_per_1000": 1000.0 * _ratio(held_conversions, len(held)),
            "holdout": uplift(cohort),
        }

    report = summary(pushes, cohorts[("all", "")])
    report["decisions"] = dict(Counter(str(r.get("decision")) for r in records))
    report["policy_versions"] = sorted({str(r.get("policy_version")) for r in records})
    report["window_s"] = window_s
    for dimension, name in (("trigger", "by_trigger"), ("segment", "by_segment")):
        report[name] = {
            value: summary([p for p in pushes if getattr(p, dimension) == value], cohort)
            for (kind, value), cohort in sorted(cohorts.items())
            if kind == dimension
        }
    return report


def uplift(cohort: _Cohort) -> dict[str, Any]:
    """Treated against holdout shoppers of one cohort: engaged share and purchases per shopper."""
    treated = [u for u in cohort.first if u not in cohort.holdout]
    held = [u for u in cohort.first if u in cohort.holdout]
    n_t, n_h = len(treated), len(held)
    e_t = sum(u in cohort.engaged for u in treated)
    e_h = sum(u in cohort.engaged for u in held)
    p_t, p_h = _ratio(e_t, n_t), _ratio(e_h, n_h)
    diff = p_t - p_h
    se = math.sqrt(p_t * (1 - p_t) / max(n_t, 1) + p_h * (1 - p_h) / max(n_h, 1))
    buys_t = [cohort.purchases[u] for u in treated]
    buys_h = [cohort.purchases[u] for u in held]
    m_t, m_h = _mean(buys_t), _mean(buys_h)
    se_buys = math.sqrt(_var(buys_t) / max(n_t, 1) + _var(buys_h) / max(n_h, 1))
    too_small = min(n_t, n_h) < MIN_GROUP or min(e_t, n_t - e_t, e_h, n_h - e_h) < MIN_OUTCOMES
    low, high = diff - Z95 * se, diff + Z95 * se
    return {
        "treated_users": n_t,
        "holdout_users": n_h,
        "treated_engaged_share": p_t,
        "holdout_engaged_share": p_h,
        "uplift": diff,
        "ci95": [low, high],
        "relative_uplift": diff / p_h if p_h > 0 else None,
        "treated_purchases_per_user": m_t,
        "holdout_purchases_per_user": m_h,
        "purchases_uplift": m_t - m_h,
        "purchases_ci95": [m_t - m_h - Z95 * se_buys, m_t - m_h + Z95 * se_buys],
        "too_small": too_small,
        "conclusive": not too_small and (low > 0 or high < 0),
    }


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _var(values: list[int]) -> float:
    """The sample variance (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
