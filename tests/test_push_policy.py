"""The push policy and its offline replay (`pushrec evaluate --push`): pure code, counted by hand."""

from __future__ import annotations

import calendar
import json
from types import SimpleNamespace as Ev

from online_models.push_evaluation import evaluate_push
from online_models.push_policy import (
    AWAY,
    BELOW_RECENT,
    BROWSE,
    CAPPED,
    CART,
    DAY_S,
    HOUR_S,
    REPLENISHMENT,
    Activity,
    Candidate,
    PushPolicy,
    RecentScores,
    hour_of_week,
)
from online_models.recommender import TopN
from pushrec.demo import SAMPLE_EVENTS, SAMPLE_ITEMS
from tests.test_cli import pushrec


def test_candidates_follow_the_reason_of_each_listed_item() -> None:
    policy = PushPolicy()
    items, scores = ["a", "b", "c", "d"], [4.0, 3.0, 2.0, 1.0]
    reasons = ["it is in your cart", "you viewed it", "time to restock tea?", "because you bought x"]
    away = policy.candidates(True, items, scores, reasons)
    assert [(c.item, c.trigger) for c in away] == [("b", BROWSE), ("c", REPLENISHMENT), ("d", AWAY)]
    assert [(c.item, c.trigger) for c in policy.candidates(False, items, scores, reasons)] == [("a", CART)]
    only_new = PushPolicy(triggers=frozenset({AWAY}))
    assert [c.item for c in only_new.candidates(True, items, scores, reasons)] == ["d"]


def test_the_budget_follows_activity_under_the_fixed_ceiling() -> None:
    policy = PushPolicy(max_per_window=3, visits_per_push=7.0)
    assert [policy.budget(v) for v in (0.0, 6.9, 7.0, 14.0, 100.0)] == [1, 1, 2, 3, 3]
    daily = Activity()
    for day in range(28):
        daily.seen(day * DAY_S, away_after_s=1800)
    assert policy.budget(daily.recent_visits(27 * DAY_S)) == 2  # ~10 recent visits
    two = [Candidate("a", 1.0), Candidate("b", 0.5)]
    assert policy.choose(two, 100.0, [50.0], {}, budget=1).outcome == CAPPED
    assert policy.choose(two, 100.0, [50.0], {"a": 50.0}, budget=2).item == "b"


def test_the_send_time_is_the_shoppers_hour_within_a_day_and_never_in_quiet_hours() -> None:
    monday_8 = float(calendar.timegm((2027, 3, 1, 8, 0, 0)))
    usual = {hour_of_week(monday_8 + 11 * HOUR_S): 5.0, hour_of_week(monday_8 + 30 * HOUR_S): 9.0}
    policy = PushPolicy(send_hour_min_visits=3)
    # 19:00 today, not the busier hour that is more than a day away
    assert policy.send_time(monday_8 + 60, usual, {}) == monday_8 + 11 * HOUR_S
    # Too few visits of their own: the shoppers' common hour.
    few = {hour_of_week(monday_8 + 2 * HOUR_S): 1.0}
    common = {hour_of_week(monday_8 + 5 * HOUR_S): 100.0}
    assert policy.send_time(monday_8, few, common) == monday_8 + 5 * HOUR_S
    assert policy.send_time(monday_8 + 60, {}, {}) == monday_8 + 60  # nothing known: now
    quiet = PushPolicy(quiet_start_hour=22, quiet_end_hour=7)
    late = float(calendar.timegm((2027, 3, 1, 23, 30, 0)))
    assert quiet.send_time(late, {}, {}) == float(calendar.timegm((2027, 3, 2, 7, 0, 0)))


def test_the_recent_bar_is_a_quantile_of_the_last_scores_that_cleared_the_threshold() -> None:
    recent = RecentScores(size=5, min_count=3)
    policy = PushPolicy(min_score=10.0, min_score_quantile=0.5)
    assert recent.bar(0.5) == float("-inf")
    for score in (11.0, 12.0, 13.0, 14.0, 15.0, 16.0):
        recent.add(score)
    assert recent.bar(0.5) == 14.0  # the last five: 12..16
    [weak, strong] = [Candidate("w", 13.0), Candidate("s", 14.0)]
    assert policy.choose([weak], 0.0, [], {}, bar=recent.bar(0.5)).outcome == BELOW_RECENT
    assert policy.choose([weak, strong], 0.0, [], {}, bar=recent.bar(0.5)).item == "s"
    recent.replace([1.0, 2.0, 3.0])
    assert recent.bar(0.5) == 2.0 and recent.bar(0.0) == float("-inf")


class PerShopper:
    """One item per shopper, at a score of the test's choosing."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        pass

    def recommend(self, user: str, n: int, explain: bool = False) -> TopN:
        return TopN(user, [f"for-{user}"], [self.scores[user]], "scripted", ["popular right now"])


def test_the_recent_bar_pushes_the_better_share_of_the_chances_at_any_scale() -> None:
    """40 shoppers, one visit each, an hour apart; their best items score 1..10, shuffled."""
    users = [f"u{k}" for k in range(40)]
    log = [Ev(user_id=u, item_id="x", type="click", ts=k * HOUR_S, rating=None) for k, u in enumerate(users)]
    pushed = {}
    for scale in (1.0, 1000.0):
        for quantile in (0.0, 0.5):
            model = PerShopper({u: scale * (1 + 7 * k % 10) for k, u in enumerate(users)})
            policy = PushPolicy(learn_send_time=False, min_score_quantile=quantile, score_window=20)
            report = evaluate_push(log, model, policy)["policies"]["product"]
            pushed[scale, quantile] = report["pushes"], report["outcomes"].get(BELOW_RECENT, 0)
    # Every shopper but the last (who leaves after the log's end) has a chance; the bar takes
    # about half of them whatever the scale of the scores.
    assert pushed[1.0, 0.0] == pushed[1000.0, 0.0] == (39, 0)
    assert pushed[1.0, 0.5] == pushed[1000.0, 0.5]
    sent, below = pushed[1.0, 0.5]
    assert sent + below == 39 and 15 <= sent <= 25


class Scripted:
    """Lists as a test wants them: user -> (items, reasons)."""

    def __init__(self, lists: dict[str, tuple[list[str], list[str]]]) -> None:
        self.lists = lists

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        pass

    def recommend(self, user: str, n: int, explain: bool = False) -> TopN:
        items, reasons = self.lists[user]
        return TopN(user, items[:n], [10.0 - k for k in range(len(items[:n]))], "scripted", reasons[:n])


def test_the_replay_counts_pushes_and_hits_on_the_logs_clock() -> None:
    """ann clicks x and y and leaves; comes back the next day, clicks w, leaves; clicks z the day
    after. bob clicks once and is seen only once more, at the log's end."""
    day = DAY_S
    log = [
        Ev(user_id="ann", item_id="x", type="click", ts=0.0, rating=None),
        Ev(user_id="ann", item_id="y", type="click", ts=60.0, rating=None),
        Ev(user_id="bob", item_id="x", type="click", ts=100.0, rating=None),
        Ev(user_id="ann", item_id="w", type="click", ts=day + 3600, rating=None),
        Ev(user_id="ann", item_id="z", type="click", ts=2 * day, rating=None),
        Ev(user_id="bob", item_id="q", type="click", ts=3 * day, rating=None),
    ]
    model = Scripted({"ann": (["y", "z"], ["you clicked it", "popular"]), "bob": (["z"], ["popular"])})
    report = evaluate_push(log, model, PushPolicy(learn_send_time=False), dataset="hand")
    product, naive = report["policies"]["product"], report["policies"]["naive"]
    # product, when each has left: ann at 1860 y (browse: it scores best), bob at 1900 z; ann at
    # day + 5400 z (y is deduped), clicked the next day: a hit. bob's last departure is after the end.
    assert product["by_trigger"] == {
        "away": {"pushes": 2, "judged": 2, "precision": 0.5},
        "browse": {"pushes": 1, "judged": 1, "precision": 0.0},
    }
    assert (product["pushes"], product["hits"], product["reach"]) == (3, 1, 1.0)
    # naive, at every refresh: ann y at 0 (clicked at 60: a hit, the echo), z at 60; bob z at
    # 100; every later list is deduped.
    assert (naive["pushes"], naive["hits"], naive["outcomes"]["deduped"]) == (3, 1, 3)
    assert report["shopper_days"] == 5 and naive["pushes_per_user_day"] == 3 / 5


def test_evaluate_push_prints_the_contract_json() -> None:
    result = pushrec("evaluate", "--push", "--json", str(SAMPLE_EVENTS), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert report["dataset"] == "sample-events"
    for name in ("product", "naive"):
        policy = report["policies"][name]
        assert {"precision", "pushes_per_user_day", "reach"} <= set(policy)
        assert 0.0 <= policy["precision"] <= 1.0 and 0.0 <= policy["reach"] <= 1.0
    assert report["policies"]["naive"]["pushes"] > 0
    bad = pushrec("evaluate", "--push", "--protocol", "both", str(SAMPLE_EVENTS))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    two = pushrec("evaluate", "--push", str(SAMPLE_EVENTS), "--items", str(SAMPLE_ITEMS), str(SAMPLE_ITEMS))
    assert two.returncode == 2 and "one ITEMS file per EVENTS file" in two.stderr
