"""`pushrec push-report`: attribution and the holdout comparison, on its own and on the real stack."""

from __future__ import annotations

import gzip
import json
import math
import time
from collections import defaultdict
from types import SimpleNamespace as Ev

import orjson
import pytest

from infra.metrics import metric_sum, scrape
from infra.stack import free_port
from online_models.push_report import push_report
from pushrec.demo import stop_process, wait_for
from stream.exposures import read_topics
from tests.conftest import Hermetic, dataset
from tests.test_pipeline_e2e import run_cli, wait_joined

ENGAGING = ("click", "add_to_cart", "purchase")


def exposure(
    push_id: str, user: str, item: str, decision: str = "sent", at: float = 100.0, **extra: object
) -> dict:  # type: ignore[type-arg]
    return {
        "push_id": push_id,
        "user_id": user,
        "item_id": item,
        "trigger": "away",
        "decision": decision,
        "group": "holdout" if decision == "holdout" else "treated",
        "decided_at": at - 1,
        "delivered_at": at if decision in ("sent", "holdout") else None,
        **extra,
    }


def event(kind: str, user: str, item: str, ts: float, push_id: str | None = None) -> Ev:
    return Ev(type=kind, user_id=user, item_id=item, ts=ts, push_id=push_id)


def test_opens_conversions_and_the_window() -> None:
    exposures = [
        exposure("p1", "a", "x"),
        exposure("p2", "b", "y"),
        exposure("p3", "c", "z", decision="capped"),
        exposure("p4", "d", "w", decision="holdout"),
    ]
    events = [
        event("push_open", "a", "x", 101, "p1"),
        event("push_open", "a", "x", 102, "p1"),  # opened twice: one open
        event("push_open", "b", "y", 101, "p9"),  # an unknown push id: no error, no open
        event("push_dismiss", "b", "y", 103, "p2"),
        event("view", "a", "x", 104),  # a view is no conversion
        event("purchase", "a", "x", 105),  # converts p1
        event("click", "b", "y", 100 + 3601),  # after the window
        event("add_to_cart", "d", "w", 150),  # the holdout's would-be conversion
        event("purchase", "a", "x", 99),  # before the delivery
    ]
    report = push_report(exposures, events, window_s=3600)
    assert (report["sent"], report["opens"], report["dismissals"], report["conversions"]) == (2, 1, 1, 1)
    assert report["open_rate"] == 0.5 and report["conversions_per_1000"] == 500.0
    assert (report["holdout_pushes"], report["holdout_conversions_per_1000"]) == (1, 1000.0)
    assert report["decisions"] == {"sent": 2, "capped": 1, "holdout": 1}
    assert report["by_trigger"]["away"]["sent"] == 2
    assert report["holdout"]["too_small"] and not report["holdout"]["conclusive"]


def test_a_repeated_record_counts_once_and_since_filters_by_decision_time() -> None:
    first = exposure("p1", "a", "x", at=100.0)
    report = push_report([first, first, exposure("p2", "b", "y", at=500.0)], [], since=300.0)
    assert report["sent"] == 1 and report["decisions"] == {"sent": 1}


def test_the_uplift_and_its_interval_on_groups_large_enough() -> None:
    """1,000 treated shoppers of whom 300 engage, 1,000 held out of whom 200: +10 points,
    standard error sqrt(.3 * .7 / 1000 + .2 * .8 / 1000)."""
    exposures, events = [], []
    for k in range(2000):
        held = k >= 1000
        user = f"u{k}"
        exposures.append(exposure(f"p{k}", user, "x", decision="holdout" if held else "sent"))
        if (k % 1000) < (200 if held else 300):
            events.append(event("click", user, "other", 200.0))
            events.append(event("purchase", user, "other", 201.0))
    held = push_report(exposures, events, window_s=3600)["holdout"]
    se = math.sqrt(0.3 * 0.7 / 1000 + 0.2 * 0.8 / 1000)
    assert held["uplift"] == pytest.approx(0.1)
    assert held["ci95"] == pytest.approx([0.1 - 1.959964 * se, 0.1 + 1.959964 * se])
    assert held["purchases_uplift"] == pytest.approx(0.1)
    assert (held["treated_users"], held["holdout_users"]) == (1000, 1000)
    assert held["conclusive"] and not held["too_small"]
    # The same difference on 20 shoppers a group: too small to say anything.
    small = push_report(exposures[980:1020], events, window_s=3600)["holdout"]
    assert small["too_small"] and not small["conclusive"]


@pytest.mark.integration
def test_replayed_log_with_simulated_opens_gives_the_report_counted_independently(hermetic: Hermetic) -> None:
    """The first half of a real taobao slice goes through worker and push sender (30 % holdout);
    a simulated shopper opens a push when the log shows them engaging with its item within a day;
    the opens and the second half follow; push-report must print what this test counts itself."""
    with gzip.open(dataset("taobao/events.jsonl.gz")) as log:
        lines = [orjson.loads(line) for _, line in zip(range(8000), log, strict=False)]
    cut, now = lines[len(lines) // 2]["ts"], time.time()
    # On the wall clock, the first half ends before the pushes and the second begins after them.
    first = [ev | {"ts": ev["ts"] - cut + now - 1} for ev in lines if ev["ts"] < cut]
    later = [ev | {"ts": ev["ts"] - cut + now + 600} for ev in lines if ev["ts"] >= cut]
    first_log = hermetic.tmp / "first.jsonl"
    first_log.write_bytes(b"\n".join(map(orjson.dumps, first)) + b"\n")
    env = {"PUSHREC_PUSH__HOLDOUT_SHARE": "0.3", "PUSHREC_PUSH__HOLDOUT_SALT": "report-test"}
    port = free_port()
    worker = hermetic.spawn("worker", "--metrics-port", str(port), log_name="worker.log", **env)
    try:
        wait_joined(port, worker)
        assert run_cli(hermetic, "replay", str(first_log)).returncode == 0
        wait_for(
            "every first-half event to be learned",
            lambda: metric_sum(scrape(port), "pushrec_event_to_list_seconds_count") >= len(first),
            120,
            worker,
        )
        outbox = hermetic.tmp / "outbox.jsonl"
        sender = hermetic.spawn(
            "push-sender", "--outbox", str(outbox), "--until-idle", "2", log_name="s.log", **env
        )
        assert sender.wait(timeout=120) == 0, hermetic.log("s.log")[-2000:]

        # The simulated shoppers: open a push whose item they engage with within a day (in the
        # log), dismiss every third of the others.
        pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
        engaged_at: dict[tuple[str, str], list[float]] = defaultdict(list)
        for ev in first + later:
            if ev["type"] in ENGAGING:
                engaged_at[ev["user_id"], ev["item_id"]].append(ev["ts"])
        answers, opened, dismissed, converted = [], set(), set(), set()
        for k, push in enumerate(pushes):
            key, sent_at = (push["user_id"], push["item_id"]), push["sent_at"]
            within = [t for t in engaged_at[key] if sent_at <= t <= sent_at + 86_400]
            kind = "push_open" if within else "push_dismiss" if k % 3 == 0 else None
            if within:
                opened.add(push["push_id"])
                converted.add(push["push_id"])
            elif kind:
                dismissed.add(push["push_id"])
            if kind:
                answer_ts = (min(within) - 1) if within else sent_at + 60
                answers.append(
                    {"event_id": f"answer-{k}", "type": kind, "user_id": key[0], "item_id": key[1]}
                    | {"ts": answer_ts, "push_id": push["push_id"]}
                )
        later_log = hermetic.tmp / "later.jsonl"
        later_events = sorted([*later, *answers], key=lambda ev: ev["ts"])
        later_log.write_bytes(b"\n".join(map(orjson.dumps, later_events)) + b"\n")
        assert run_cli(hermetic, "replay", str(later_log)).returncode == 0
        wait_for(
            "the answers to be learned",
            lambda: metric_sum(scrape(port), "pushrec_events_total") >= len(lines) + len(answers),
            120,
            worker,
        )
        samples = scrape(port)
        for kind, wanted in (("push_open", opened), ("push_dismiss", dismissed)):
            assert metric_sum(samples, "pushrec_events_total", type=kind, outcome="processed") == len(wanted)
    finally:
        stop_process(worker)

    # What this test counts itself: the groups from the hash, outcomes from the log.
    records = [orjson.loads(v) for _, v in read_topics(hermetic.kafka, [f"{hermetic.prefix}.pushes"])]
    held_out = {r["user_id"] for r in records if r["decision"] == "holdout"}
    treated = {p["user_id"] for p in pushes}
    assert held_out and treated and not held_out & treated  # no holdout shopper got a push
    first_push: dict[str, float] = {}
    for r in records:
        if r["decision"] in ("sent", "holdout"):
            first_push[r["user_id"]] = min(first_push.get(r["user_id"], math.inf), r["delivered_at"])
    engaged = {
        ev["user_id"]
        for ev in later
        if ev["type"] in ENGAGING
        and ev["user_id"] in first_push
        and first_push[ev["user_id"]] <= ev["ts"] <= first_push[ev["user_id"]] + 86_400
    }
    share = lambda group: len(engaged & group) / len(group)  # noqa: E731

    shown = run_cli(hermetic, "push-report", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert (report["sent"], report["opens"], report["dismissals"]) == (
        len(pushes),
        len(opened),
        len(dismissed),
    )
    assert report["conversions"] == len(converted)
    assert report["open_rate"] == pytest.approx(len(opened) / len(pushes))
    held = report["holdout"]
    assert (held["treated_users"], held["holdout_users"]) == (len(treated), len(held_out))
    assert held["uplift"] == pytest.approx(share(treated) - share(held_out))
    assert held["ci95"][0] < held["uplift"] < held["ci95"][1]
    text = run_cli(hermetic, "push-report")
    assert text.returncode == 0 and f"sent {len(pushes):,}, opened {len(opened):,}" in text.stdout
    assert "95 % CI" in text.stdout
    print(text.stdout)  # noqa: T201 - the figures, for the closing note (pytest -s)
