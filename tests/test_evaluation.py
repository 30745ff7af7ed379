"""Prequential evaluation: metric values checked by hand, and the CLI's JSON contract."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace as Ev

import pytest

from online_models.evaluation import evaluate, evaluate_visits, visits
from online_models.recommender import TopN
from pushrec.demo import SAMPLE_EVENTS
from tests.test_cli import pushrec


class FixedRanker:
    """Always recommends x, y, z; records what it learned."""

    def __init__(self) -> None:
        self.learned: list[str] = []

    def learn_one(self, user: str, item: str, kind: str, ts: float, rating: float | None = None) -> None:
        self.learned.append(item)

    def recommend(self, user: str, n: int) -> TopN:
        return TopN(user, ["x", "y", "z"][:n], [3.0, 2.0, 1.0][:n], "fixed")


def ev(item: str, kind: str = "view", rating: float | None = None) -> Ev:
    return Ev(user_id="u", item_id=item, type=kind, ts=0.0, rating=rating)


def test_metrics_match_hand_computed_values() -> None:
    log = [ev("x"), ev("z", "click"), ev("w", "purchase"), ev("v", "rating", 2.0), ev("x", "add_to_cart")]
    ranker = FixedRanker()
    report = evaluate(log, {"fixed": ranker}, k=3)
    m = report.models["fixed"]
    assert (report.events, report.targets) == (5, 4)  # the 2-star rating is not a target
    assert m["hr"] == pytest.approx(3 / 4)  # x (rank 1), z (rank 3), x again (rank 1); w missed
    assert m["ndcg"] == pytest.approx((1 + 1 / math.log2(4) + 1) / 4)
    assert m["precision"] == pytest.approx(3 / 4 / 3) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 4) * (3 / 4) / (1 / 4 + 3 / 4))
    assert m["coverage"] == pytest.approx(3 / 4)  # x, y, z of the 4 items seen
    assert m["new_item_hr"] == pytest.approx(2 / 3)  # first x, z hit; w missed; second x is not new
    assert m["cold_item_hr"] == pytest.approx(2 / 3)  # x, z, w first seen in the stream (one user)
    assert ranker.learned == ["x", "z", "w", "v", "x"]  # every event learned, after it was scored


def test_scoring_happens_before_learning() -> None:
    from online_models.baselines import RecentRanker

    report = evaluate([ev("a"), ev("a")], {"recent": RecentRanker()}, k=1)
    assert report.models["recent"]["hr"] == 0.5  # the first view cannot be predicted from itself


def test_evaluate_cli_json_contract() -> None:
    result = pushrec("evaluate", str(SAMPLE_EVENTS), "--json", "--k", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"dataset", "protocol", "k", "events", "targets", "models"}
    assert report["protocol"] == "next-event"
    assert report["k"] == 5 and report["events"] == 3000
    # dev installs eval (als); sr and repeat are the baselines SPEC added on 2026-12-01
    assert set(report["models"]) == {"pushrec", "popularity", "recent", "funkmf", "sr", "repeat", "als"}
    for metrics in report["models"].values():
        assert set(metrics) == {
            "hr",
            "ndcg",
            "precision",
            "recall",
            "f1",
            "coverage",
            "new_item_hr",
            "cold_item_hr",
            "events_per_s",
        }
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "events_per_s")


def test_evaluate_over_several_logs_prints_one_json_report_each(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_pipeline_e2e import head

    small = head(SAMPLE_EVENTS, tmp_path / "small.jsonl", 200)
    result = pushrec("evaluate", str(SAMPLE_EVENTS), str(small), "--json", "--model", "popularity")
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["events"] for r in reports] == [3000, 200]
    assert [r["dataset"] for r in reports] == ["sample-events", "small"]


def test_cold_item_hr_counts_items_first_seen_in_the_stream() -> None:
    other = Ev(user_id="v", item_id="z", type="view", ts=0.0, rating=None)
    report = evaluate([ev("x"), other, ev("z")], {"fixed": FixedRanker()}, k=3)
    m = report.models["fixed"]
    assert m["new_item_hr"] == 1.0  # x and z were new to u, and v's z too, all listed
    assert m["cold_item_hr"] == 1.0 and report.targets == 3  # u's z is not cold: v touched it first


def test_evaluate_with_a_catalogue_adds_the_no_content_row() -> None:
    from pushrec.demo import SAMPLE_ITEMS

    result = pushrec(
        "evaluate", str(SAMPLE_EVENTS), "--items", str(SAMPLE_ITEMS), "--json", "--model", "pushrec"
    )
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    assert list(models)[:2] == ["pushrec", "pushrec-no-content"]
    assert models["pushrec"]["hr"] > 0 and models["pushrec-no-content"]["cold_item_hr"] == 0.0
    bad = pushrec("evaluate", str(SAMPLE_EVENTS), "--items", str(SAMPLE_ITEMS), str(SAMPLE_ITEMS))
    assert bad.returncode == 2 and "one ITEMS file per EVENTS file" in bad.stderr


def test_evaluate_markdown_table() -> None:
    result = pushrec("evaluate", str(SAMPLE_EVENTS), "--markdown", "--k", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("**sample-events**, next-event (3,000 events")
    assert lines[2].startswith("| model | HR | NDCG |")
    assert {line.split(" | ")[0] for line in lines[4:]} == {
        "| pushrec",
        "| popularity",
        "| recent",
        "| funkmf",
        "| sr",
        "| repeat",
        "| als",
    }


def at(user: str, item: str, ts: float, kind: str = "click", session: str | None = None) -> Ev:
    return Ev(user_id=user, item_id=item, type=kind, ts=ts, rating=None, session_id=session)


def test_visits_split_on_a_gap_or_a_new_session_and_judge_later_ones_by_what_was_engaged() -> None:
    log = [
        at("u", "a", 0),  # u's first visit: never judged
        at("u", "b", 60),
        at("v", "a", 100, session="s1"),
        at("v", "b", 101, session="s2"),  # a new session: v's second visit
        at("u", "c", 4000),  # more than 30 minutes later: u's second visit
        at("u", "x", 4010, kind="view"),  # a view: not engagement on a log with clicks
        at("u", "d", 4020, kind="purchase"),
        at("u", "e", 9000, kind="view"),  # u's third visit: views only, not judged
    ]
    judged, later = visits(log, gap_s=1800)
    assert later == 3 and sorted(judged) == [3, 4]
    assert judged[4].items == ["c", "d"] and judged[4].new == {"c", "d"} and judged[3].cold == set()

    ranker = FixedRanker()  # lists x, y, z
    report = evaluate_visits(
        [*log[:4], at("u", "x", 4000), at("u", "z", 4010, kind="add_to_cart")], {"fixed": ranker}, k=3
    )
    m = report.models["fixed"]
    assert report.protocol == "next-session" and report.targets == 2  # v's and u's second visits
    assert m["hr"] == pytest.approx(1 / 2)  # u's visit engaged x and z, both listed; v's b was not
    assert m["recall"] == pytest.approx((0 + 1) / 2)
    assert m["ndcg"] == pytest.approx((0 + (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))) / 2)
    assert m["visit_coverage"] == 1.0


def test_evaluate_both_protocols_prints_a_report_for_each() -> None:
    result = pushrec("evaluate", str(SAMPLE_EVENTS), "--json", "--protocol", "both", "--model", "popularity")
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["protocol"] for r in reports] == ["next-event", "next-session"]
    session = reports[1]
    assert 0 < session["targets"] < session["events"]
    assert 0 < session["models"]["popularity"]["visit_coverage"] <= 1
