"""The push sender against real Valkey: cap, dedupe, idempotent redelivery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import redis

from consumers.push_sender import AWAY_LIST_POLL_S, AWAY_LIST_WAIT_S, PushSender
from infra.store import Keys, RedisTopNStore, connect
from online_models.recommender import TopN
from stream.events import Item
from tests.conftest import Hermetic

pytestmark = pytest.mark.integration


async def write(hermetic: Hermetic, *lists: TopN) -> None:
    client = connect(hermetic.servers.redis_url)
    try:
        for top in lists:  # one at a time, so each gets its own version and stream entry
            await RedisTopNStore(client, Keys(f"{hermetic.prefix}:")).write_lists([top], 1.0)
    finally:
        await client.aclose()


def run_sender(hermetic: Hermetic, outbox: Path, **env: str) -> PushSender:
    sender = PushSender(
        hermetic.settings(**env), hermetic.kafka, hermetic.servers.redis_url, outbox, until_idle_s=0.5
    )
    asyncio.run(sender.run())
    return sender


def test_cap_dedupe_and_no_double_push_on_redelivery(hermetic: Hermetic, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    run = lambda: run_sender(hermetic, outbox, PUSHREC_PUSH__MAX_PER_WINDOW="5")  # noqa: E731
    asyncio.run(write(hermetic, TopN("alice", ["a", "b"], [0.9, 0.5], "pushrec")))
    run()
    asyncio.run(write(hermetic, TopN("alice", ["a", "b"], [0.9, 0.6], "pushrec")))
    run()  # a was pushed: dedupe picks b
    asyncio.run(write(hermetic, TopN("alice", ["a", "b"], [0.9, 0.7], "pushrec")))
    sender = run()  # both pushed within the dedupe window
    asyncio.run(write(hermetic, TopN("bob", ["x"], [0.1], "popularity")))
    run()
    pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    assert [(p["user_id"], p["item_id"]) for p in pushes] == [("alice", "a"), ("alice", "b"), ("bob", "x")]
    assert pushes[0]["list_version"] < pushes[1]["list_version"]
    assert sender.metrics.pushes.labels("deduped")._value.get() == 1

    # Rewind the group as if every entry had been read but never acknowledged: it is activity
    # seen again, the two shoppers are considered again, and nothing is pushed twice.
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    client.xgroup_setid(f"{hermetic.prefix}:refreshed", f"{hermetic.prefix}-sender", id="0")
    again = run()
    assert len(outbox.read_bytes().splitlines()) == 3
    assert again.metrics.push_entries.labels("observed")._value.get() == 4
    assert again.metrics.pushes.labels("deduped")._value.get() == 2  # alice's a and b, bob's x


def test_a_burst_of_refreshes_is_one_decision_on_the_newest_list(hermetic: Hermetic, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    asyncio.run(write(hermetic, *[TopN("carol", [f"i{k}"], [1.0], "pushrec") for k in range(4)]))
    sender = run_sender(hermetic, outbox)
    pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    stored = redis.Redis.from_url(hermetic.servers.redis_url).hget(f"{hermetic.prefix}:recs:carol", "version")
    assert [(p["item_id"], p["list_version"]) for p in pushes] == [("i3", int(stored))]  # the newest
    assert sender.metrics.push_entries.labels("observed")._value.get() == 4
    assert sender.metrics.pushes.labels("sent")._value.get() == 1


def test_frequency_cap(hermetic: Hermetic, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    for k in range(4):
        asyncio.run(write(hermetic, TopN("dave", [f"i{k}"], [1.0], "pushrec")))
        sender = run_sender(hermetic, outbox, PUSHREC_PUSH__MAX_PER_WINDOW="2")
    assert [orjson.loads(line)["item_id"] for line in outbox.read_bytes().splitlines()] == ["i0", "i1"]
    assert sender.metrics.pushes.labels("capped")._value.get() == 1


def test_kill_9_between_delivery_and_ack_neither_duplicates_nor_loses(hermetic: Hermetic) -> None:
    """The sender dies right after its 3rd delivery (outbox fsync'd, nothing recorded or acked in
    Redis); restarted, it must deliver exactly what an uninterrupted sender delivers."""
    import subprocess
    import sys

    lists = [TopN(f"user{u}", [f"i{u}", f"j{u}"], [0.9, 0.5], "pushrec") for u in range(8)]

    def deliver(h: Hermetic, name: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pushrec.cli",
                "push-sender",
                "--outbox",
                str(h.tmp / name),
                "--until-idle",
                "1",
            ],
            env=h.env(**env),
            capture_output=True,
            timeout=60,
            check=False,
        )

    clean = hermetic.fresh()
    asyncio.run(write(clean, *lists))
    assert deliver(clean, "outbox.jsonl").returncode == 0
    asyncio.run(write(hermetic, *lists))
    crashed = deliver(hermetic, "outbox.jsonl", PUSHREC_FAULTS="push_sender.after_delivery=3")
    assert crashed.returncode == -9, crashed.stderr  # died at the fault point
    assert len((hermetic.tmp / "outbox.jsonl").read_bytes().splitlines()) == 3
    restarted = deliver(hermetic, "outbox.jsonl")
    assert restarted.returncode == 0, restarted.stderr

    def read(h: Hermetic) -> list[dict]:  # type: ignore[type-arg]
        return [orjson.loads(line) for line in (h.tmp / "outbox.jsonl").read_bytes().splitlines()]

    delivered = read(hermetic)
    assert len({p["notification_id"] for p in delivered}) == len(delivered) == len(lists)  # none twice
    assert sorted((p["user_id"], p["item_id"]) for p in delivered) == sorted(
        (p["user_id"], p["item_id"]) for p in read(clean)
    )
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    pending = client.xpending(f"{hermetic.prefix}:refreshed", f"{hermetic.prefix}-sender")
    assert pending["pending"] == 0


def run_survivor(hermetic: Hermetic, outbox: Path, **env: str) -> None:
    """A sender on another host that claims what a dead one read after 0.1 s."""
    sender = PushSender(
        hermetic.settings(PUSHREC_PUSH__CLAIM_IDLE_S="0.1", **env),
        hermetic.kafka,
        hermetic.servers.redis_url,
        outbox,
        until_idle_s=1.0,
        consumer_name="live-host",
    )
    asyncio.run(sender.run())


def test_a_second_sender_claims_entries_a_crashed_one_left(hermetic: Hermetic, tmp_path: Path) -> None:
    asyncio.run(write(hermetic, TopN("carol", ["a"], [0.9], "pushrec")))
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    stream, group = f"{hermetic.prefix}:refreshed", f"{hermetic.prefix}-sender"
    client.xgroup_create(stream, group, id="0", mkstream=True)
    client.xreadgroup(group, "dead-host", {stream: ">"}, count=10)  # read, never acked
    outbox = tmp_path / "outbox.jsonl"
    run_survivor(hermetic, outbox)
    assert [orjson.loads(line)["user_id"] for line in outbox.read_bytes().splitlines()] == ["carol"]
    assert client.xpending(stream, group)["pending"] == 0


def set_prices(hermetic: Hermetic, *items: Item) -> None:
    """Publish these catalogue entries as the worker would (a lower price is a price drop)."""

    async def write_items() -> None:
        client = connect(hermetic.servers.redis_url)
        try:
            await RedisTopNStore(client, Keys(f"{hermetic.prefix}:")).write_items(list(items))
        finally:
            await client.aclose()

    asyncio.run(write_items())


def test_a_price_drop_a_crashed_sender_read_is_pushed_by_another(hermetic: Hermetic, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    set_prices(hermetic, Item("seen", price=100.0), Item("new", price=10.0))
    listed = TopN(
        "gina", ["new", "seen"], [50.0, 45.0], "pushrec", reasons=["because you viewed x", "you viewed it"]
    )
    asyncio.run(write(hermetic, listed))
    run_sender(hermetic, outbox)  # she left: "new" is pushed, and she watches "seen" (she viewed it)
    set_prices(hermetic, Item("seen", price=80.0))
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    drops, group = f"{hermetic.prefix}:price-drops", f"{hermetic.prefix}-sender"
    assert client.xreadgroup(group, "dead-host", {drops: ">"}, count=10)  # read, then it crashed
    run_survivor(hermetic, outbox, PUSHREC_PUSH__MAX_PER_WINDOW="9")
    assert [(p["item_id"], p["trigger"]) for p in sent(outbox)] == [("new", "away"), ("seen", "price_drop")]
    assert client.xpending(drops, group)["pending"] == 0


def test_entries_trimmed_before_a_sender_decided_them_are_counted(hermetic: Hermetic, tmp_path: Path) -> None:
    """Issue 19, item 5: the refresh stream is capped, so while every sender is down the cap drops
    entries no sender read, and entries one had read before it crashed come back empty: pushes
    lost without a trace, and the empty ones crashed the sender (KeyError) on restart."""
    import socket

    stream, group = f"{hermetic.prefix}:refreshed", f"{hermetic.prefix}-sender"
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    client.xgroup_create(stream, group, id="0", mkstream=True)  # the senders exist, all are down

    async def write_many(users: range, maxlen: int) -> None:
        store_client = connect(hermetic.servers.redis_url)
        store = RedisTopNStore(store_client, Keys(f"{hermetic.prefix}:"), stream_maxlen=maxlen)
        try:
            await store.write_lists([TopN(f"u{k}", ["a"], [1.0], "pushrec") for k in users], 1.0)
        finally:
            await store_client.aclose()

    asyncio.run(write_many(range(3), 100_000))
    client.xreadgroup(group, socket.gethostname(), {stream: ">"}, count=2)  # read, then it crashed
    for start in range(3, 1203, 200):
        asyncio.run(write_many(range(start, start + 200), 50))
    info = client.xinfo_stream(stream)
    lost = info["entries-added"] - info["length"]  # the two read ones included: never decided
    assert lost > 1000

    sender = run_sender(hermetic, tmp_path / "outbox.jsonl")
    entries = sender.metrics.push_entries
    assert entries.labels("trimmed")._value.get() == lost
    assert entries.labels("observed")._value.get() == info["length"]
    # Counted once for the group: a second sender finds nothing new.
    again = run_sender(hermetic, tmp_path / "outbox.jsonl")
    assert again.metrics.push_entries.labels("trimmed")._value.get() == 0


def test_a_list_after_forget_or_a_redis_restart_is_new_and_the_senders_memory_stays_small(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    """Issue 19, item 4: list versions restarted at 1 once the user's hash was gone (forget, an
    eviction, an embedded Valkey restarted without persistence), so the next list looked already
    sent ("alice:1" was in the sender's memory of the outbox) and was suppressed while counted
    sent; and that memory grew with every notification."""
    outbox = tmp_path / "outbox.jsonl"
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    asyncio.run(write(hermetic, *[TopN(f"user{u}", ["a"], [1.0], "pushrec") for u in range(30)]))
    first = run_sender(hermetic, outbox)
    assert first.metrics.pushes.labels("sent")._value.get() == 30
    assert len(first.delivery._delivered) == 0  # type: ignore[attr-defined]  # each left once recorded
    # Everything of user0 and user1 is gone from Redis, as after forget or a restart.
    for user in ("user0", "user1"):
        client.delete(*(f"{hermetic.prefix}:{k}:{user}" for k in ("recs", "push:sent", "push:items")))
    asyncio.run(
        write(hermetic, TopN("user0", ["b"], [1.0], "pushrec"), TopN("user1", ["b"], [1.0], "pushrec"))
    )
    again = run_sender(hermetic, outbox)
    pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    assert [(p["user_id"], p["item_id"]) for p in pushes[30:]] == [("user0", "b"), ("user1", "b")]
    assert len({p["notification_id"] for p in pushes}) == 32
    assert again.metrics.pushes.labels("sent")._value.get() == 2


def test_unreadable_outbox_lines_are_logged_not_passed_over_silently(
    hermetic: Hermetic, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    asyncio.run(write(hermetic, TopN("alice", ["a"], [0.9], "pushrec")))
    run_sender(hermetic, outbox)
    with open(outbox, "ab") as f:
        f.write(b'not a notification\n{"user_id": "half')  # a stray line, then a torn one
    asyncio.run(write(hermetic, TopN("bob", ["x"], [0.5], "pushrec")))
    with caplog.at_level("WARNING", logger="pushrec"):
        run_sender(hermetic, outbox)
    assert "outbox ended in a torn line: dropped its last 17 bytes" in caplog.text
    assert "1 line(s) that are not notifications were skipped" in caplog.text
    lines = outbox.read_bytes().splitlines()
    assert lines[1] == b"not a notification" and orjson.loads(lines[-1])["user_id"] == "bob"


class Clock:
    """The sender's wall clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_at(hermetic: Hermetic, outbox: Path, clock: Clock, **env: str) -> PushSender:
    sender = PushSender(
        hermetic.settings(**env),
        hermetic.kafka,
        hermetic.servers.redis_url,
        outbox,
        until_idle_s=0.3,
        clock=clock,
    )
    asyncio.run(sender.run())
    return sender


def sent(outbox: Path) -> list[dict]:  # type: ignore[type-arg]
    return [orjson.loads(line) for line in outbox.read_bytes().splitlines()] if outbox.exists() else []


# (With the worker's visit gap longer than that, no list re-ranked as away is waited for: see
# test_the_decision_for_a_shopper_who_left_waits_for_their_away_list_which_is_no_activity.)
AWAY_HALF_AN_HOUR = {
    "PUSHREC_PUSH__AWAY_AFTER_S": "1800",
    "PUSHREC_PUSH__MIN_SCORE": "0.5",
    "PUSHREC_MODEL__VISIT_GAP_S": "3600",
}


def test_a_shopper_who_is_active_gets_no_push_and_one_who_left_gets_the_best_new_item(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    outbox, clock = tmp_path / "outbox.jsonl", Clock(1_800_000_000.0)
    erin = TopN(
        "erin",
        ["seen", "new", "weak"],
        [90.0, 3.0, 0.1],
        "pushrec",
        ["you viewed it", "popular right now", "popular right now"],
    )
    asyncio.run(write(hermetic, erin))
    run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR, PUSHREC_PUSH__TRIGGER_BROWSE="false")
    clock.now += 600
    asyncio.run(write(hermetic, erin))  # still shopping
    run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR, PUSHREC_PUSH__TRIGGER_BROWSE="false")
    clock.now += 1799  # half an hour after her first event, but not after her last
    run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR, PUSHREC_PUSH__TRIGGER_BROWSE="false")
    assert sent(outbox) == []
    clock.now += 2
    sender = run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR, PUSHREC_PUSH__TRIGGER_BROWSE="false")
    [push] = sent(outbox)
    assert (push["item_id"], push["trigger"], push["sent_at"]) == ("new", "away", clock.now)
    assert sender.metrics.push_decisions.labels("away", "sent")._value.get() == 1
    # Nothing new clears the relevance threshold: no push, and why.
    asyncio.run(write(hermetic, TopN("fred", ["weak"], [0.1], "pushrec", ["popular right now"])))
    clock.now += 1801
    run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR)
    clock.now += 1801
    sender = run_at(hermetic, outbox, clock, **AWAY_HALF_AN_HOUR)
    assert len(sent(outbox)) == 1
    assert sender.metrics.pushes.labels("below_threshold")._value.get() == 1


def test_the_decision_for_a_shopper_who_left_waits_for_their_away_list_which_is_no_activity(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    """The worker ranks a shopper once more when they have left (a list flagged away): the
    sender decides on that list, waiting for it up to AWAY_LIST_WAIT_S past the due time, and
    does not take it for the shopper's activity. Without it, the list they have is used."""
    outbox, clock = tmp_path / "outbox.jsonl", Clock(1_800_000_000.0)
    env = {**AWAY_HALF_AN_HOUR, "PUSHREC_MODEL__VISIT_GAP_S": "1800", "PUSHREC_PUSH__TRIGGER_BROWSE": "false"}
    asyncio.run(write(hermetic, TopN("gina", ["in_visit"], [3.0], "pushrec", ["popular right now"])))
    asyncio.run(write(hermetic, TopN("hank", ["in_visit"], [3.0], "pushrec", ["popular right now"])))
    run_at(hermetic, outbox, clock, **env)
    clock.now += 1801
    run_at(hermetic, outbox, clock, **env)  # due, and no list of them away yet: waiting
    assert sent(outbox) == []
    gina = TopN("gina", ["for_later"], [3.0], "pushrec", ["popular right now"], away=True)
    asyncio.run(write(hermetic, gina))
    clock.now += AWAY_LIST_POLL_S
    run_at(hermetic, outbox, clock, **env)
    assert [(p["user_id"], p["item_id"]) for p in sent(outbox)] == [("gina", "for_later")]
    client = redis.Redis.from_url(hermetic.servers.redis_url)
    assert client.zscore(f"{hermetic.prefix}:push:due", "away:gina") is None  # not seen as back
    clock.now += AWAY_LIST_WAIT_S
    run_at(hermetic, outbox, clock, **env)  # hank's never came: decided on the list he has
    assert [(p["user_id"], p["item_id"]) for p in sent(outbox)] == [
        ("gina", "for_later"),
        ("hank", "in_visit"),
    ]


def test_the_recent_bar_is_shared_by_the_senders_through_redis(hermetic: Hermetic, tmp_path: Path) -> None:
    """Each shopper is decided by a new sender, which knows the earlier ones' scores only from
    Redis: a push must score the median of the last pushes' scores."""
    outbox = tmp_path / "outbox.jsonl"
    bar = {"PUSHREC_PUSH__MIN_SCORE_QUANTILE": "0.5", "PUSHREC_PUSH__SCORE_WINDOW": "20"}
    outcomes, bars = [], []
    for user, score in (("a", 10.0), ("b", 20.0), ("c", 30.0), ("low", 12.0), ("high", 25.0)):
        asyncio.run(write(hermetic, TopN(user, [f"for-{user}"], [score], "pushrec")))
        sender = run_sender(hermetic, outbox, **bar)
        outcomes.append(sender.metrics.pushes.labels("below_recent")._value.get())
        bars.append(sender.metrics.push_score_bar._value.get())
    # low: under the median of 10, 20 and 30; high: above that of 10, 20, 30 and 12
    pushed = [orjson.loads(line)["user_id"] for line in outbox.read_bytes().splitlines()]
    assert pushed == ["a", "b", "c", "high"]
    assert outcomes == [0, 0, 0, 1, 0]
    assert bars == [float("-inf"), 10.0, 15.0, 20.0, 16.0]  # the bar each decision met
    scores = redis.Redis.from_url(hermetic.servers.redis_url).lrange(f"{hermetic.prefix}:push:scores", 0, -1)
    assert [float(s) for s in scores] == [25.0, 12.0, 30.0, 20.0, 10.0]  # newest first, sent or not
    [under] = [r for r in exposures(hermetic) if r["decision"] == "below_recent"]
    assert (under["user_id"], under["item_id"], under["score"]) == ("low", None, 12.0)


def test_a_price_drop_is_news_that_the_recent_bar_does_not_hold_back(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    bar = {"PUSHREC_PUSH__MIN_SCORE_QUANTILE": "0.5", "PUSHREC_PUSH__SCORE_WINDOW": "20"}
    redis.Redis.from_url(hermetic.servers.redis_url).lpush(f"{hermetic.prefix}:push:scores", *[100.0] * 20)
    listed = TopN(
        "gina", ["new", "seen"], [50.0, 45.0], "pushrec", reasons=["because you viewed x", "you viewed it"]
    )
    set_prices(hermetic, Item("seen", price=100.0), Item("new", price=10.0))
    asyncio.run(write(hermetic, listed))
    left = run_sender(hermetic, outbox, **bar)  # she left: nothing reaches the bar of 100
    assert left.metrics.pushes.labels("below_recent")._value.get() == 1 and sent(outbox) == []
    set_prices(hermetic, Item("seen", price=80.0))  # but she watches "seen", which she viewed
    run_sender(hermetic, outbox, **bar)
    assert [(p["item_id"], p["trigger"]) for p in sent(outbox)] == [("seen", "price_drop")]
    scores = redis.Redis.from_url(hermetic.servers.redis_url).lrange(f"{hermetic.prefix}:push:scores", 0, 0)
    assert scores == [b"50.0"]  # the away decision's score counts in the bar; the drop's does not


def test_an_abandoned_cart_gets_its_push_with_its_reason(hermetic: Hermetic, tmp_path: Path) -> None:
    outbox, clock = tmp_path / "outbox.jsonl", Clock(1_800_000_000.0)
    env = {**AWAY_HALF_AN_HOUR, "PUSHREC_PUSH__TRIGGER_CART": "true", "PUSHREC_PUSH__CART_AFTER_S": "14400"}
    gina = TopN(
        "gina", ["shoes", "socks"], [80.0, 5.0], "pushrec", ["it is in your cart", "popular right now"]
    )
    asyncio.run(write(hermetic, gina, TopN("hal", ["hat"], [5.0], "pushrec", ["popular right now"])))
    run_at(
        hermetic, outbox, clock, **env, PUSHREC_PUSH__MAX_PER_WINDOW="3", PUSHREC_PUSH__VISITS_PER_PUSH="1e-9"
    )
    clock.now += 1801  # both have left: the best new item for each
    run_at(
        hermetic, outbox, clock, **env, PUSHREC_PUSH__MAX_PER_WINDOW="3", PUSHREC_PUSH__VISITS_PER_PUSH="1e-9"
    )
    assert sorted((p["user_id"], p["item_id"], p["trigger"]) for p in sent(outbox)) == [
        ("gina", "socks", "away"),
        ("hal", "hat", "away"),
    ]
    clock.now += 14400 - 1800  # four hours after her last event the cart is abandoned (hal has none)
    run_at(
        hermetic, outbox, clock, **env, PUSHREC_PUSH__MAX_PER_WINDOW="3", PUSHREC_PUSH__VISITS_PER_PUSH="1e-9"
    )
    cart = sent(outbox)[2:]
    assert [(p["user_id"], p["item_id"], p["trigger"], p["reason"]) for p in cart] == [
        ("gina", "shoes", "cart", "it is in your cart")
    ]


def test_a_push_decided_in_quiet_hours_is_sent_at_their_end_unless_the_shopper_came_back(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    import calendar

    outbox = tmp_path / "outbox.jsonl"
    night = calendar.timegm((2027, 3, 1, 22, 40, 0))  # UTC; quiet from 23:00 to 07:00
    env = {**AWAY_HALF_AN_HOUR, "PUSHREC_PUSH__QUIET_START_HOUR": "23", "PUSHREC_PUSH__QUIET_END_HOUR": "7"}
    clock = Clock(float(night))
    asyncio.run(
        write(hermetic, TopN("ida", ["lamp"], [5.0], "pushrec"), TopN("jo", ["mug"], [5.0], "pushrec"))
    )
    run_at(hermetic, outbox, clock, **env)
    clock.now += 1801  # 23:10: decided, held for the morning
    sender = run_at(hermetic, outbox, clock, **env)
    assert sent(outbox) == []
    assert sender.metrics.pushes.labels("quiet_hours")._value.get() == 2
    assert sender.metrics.push_held._value.get() == 2
    morning = float(calendar.timegm((2027, 3, 2, 7, 0, 0)))
    clock.now = morning - 60
    asyncio.run(write(hermetic, TopN("jo", ["mug"], [5.0], "pushrec")))  # jo is back at 06:59
    run_at(hermetic, outbox, clock, **env)
    assert sent(outbox) == []
    clock.now = morning + 1
    sender = run_at(hermetic, outbox, clock, **env)
    [push] = sent(outbox)
    assert (push["user_id"], push["send_at"], push["sent_at"]) == ("ida", morning, morning + 1)
    assert sender.metrics.pushes.labels("active")._value.get() == 1  # jo's: she came back


def test_a_shopper_considered_again_with_no_new_list_gets_no_second_push(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    """alice's two refresh entries fall in two reads of the stream (100 entries each), both after
    her last list was written: two considerations of one list, one push."""
    outbox = tmp_path / "outbox.jsonl"
    others = [TopN(f"u{k}", ["x"], [1.0], "pushrec") for k in range(100)]
    asyncio.run(write(hermetic, TopN("alice", ["a", "b"], [0.9, 0.5], "pushrec"), *others))
    asyncio.run(write(hermetic, TopN("alice", ["a", "b"], [0.9, 0.5], "pushrec")))
    sender = run_sender(hermetic, outbox, PUSHREC_PUSH__MAX_PER_WINDOW="5")
    alice = [p for p in sent(outbox) if p["user_id"] == "alice"]
    assert [p["item_id"] for p in alice] == ["a"]
    assert sender.metrics.pushes.labels("deduped")._value.get() == 1


def exposures(hermetic: Hermetic) -> list[dict]:  # type: ignore[type-arg]
    from stream.exposures import read_topics

    return [orjson.loads(value) for _, value in read_topics(hermetic.kafka, [f"{hermetic.prefix}.pushes"])]


def test_the_holdout_never_gets_a_push_and_stays_the_same_across_restarts_and_senders(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    from online_models.push_policy import in_holdout

    outbox, users = tmp_path / "outbox.jsonl", [f"s{k}" for k in range(40)]
    env = {"PUSHREC_PUSH__HOLDOUT_SHARE": "0.5", "PUSHREC_PUSH__HOLDOUT_SALT": "test"}
    held_out = {u for u in users if in_holdout(u, 0.5, "test")}
    assert 10 < len(held_out) < 30
    for round_, name in enumerate(("sender-a", "sender-b")):  # a restart, and another sender
        asyncio.run(write(hermetic, *[TopN(u, [f"i{round_}"], [1.0], "pushrec") for u in users]))
        settings = hermetic.settings(**env)
        sender = PushSender(settings, hermetic.kafka, hermetic.servers.redis_url, outbox, consumer_name=name)
        sender.until_idle_s = 0.5
        asyncio.run(sender.run())
        assert sender.metrics.pushes.labels("holdout")._value.get() == len(held_out)
    pushed = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    assert sorted(p["user_id"] for p in pushed) == sorted(2 * [u for u in users if u not in held_out])
    records = exposures(hermetic)
    assert len(records) == 2 * len(users)  # one per decision, sent or not
    for record in records:
        held = record["user_id"] in held_out
        assert (record["group"], record["decision"]) == (
            ("holdout", "holdout") if held else ("treated", "sent")
        )
        assert record["delivered_at"] is not None and record["item_id"] in ("i0", "i1")
    assert {r["push_id"] for r in records if r["decision"] == "sent"} == {p["push_id"] for p in pushed}
    assert len({r["policy_version"] for r in records}) == 1


def test_a_decision_without_a_push_is_in_the_exposure_log_too(hermetic: Hermetic, tmp_path: Path) -> None:
    asyncio.run(write(hermetic, TopN("erin", ["a"], [0.5], "pushrec")))
    run_sender(hermetic, tmp_path / "outbox.jsonl", PUSHREC_PUSH__MIN_SCORE="40")
    [record] = exposures(hermetic)
    assert not (tmp_path / "outbox.jsonl").exists() or not (tmp_path / "outbox.jsonl").read_bytes()
    assert (record["user_id"], record["decision"], record["item_id"], record["delivered_at"]) == (
        "erin",
        "below_threshold",
        None,
        None,
    )
    assert record["group"] == "treated" and record["decided_at"] > 0


def test_opens_dismissals_and_conversions_are_counted_live_and_once(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    import time

    from kafka import KafkaProducer

    from online_models.push_policy import in_holdout

    env = {"PUSHREC_PUSH__HOLDOUT_SHARE": "0.5", "PUSHREC_PUSH__HOLDOUT_SALT": "live"}
    people = [f"p{k}" for k in range(20)]
    opener, dismisser = [u for u in people if not in_holdout(u, 0.5, "live")][:2]
    held = next(u for u in people if in_holdout(u, 0.5, "live"))
    asyncio.run(
        write(hermetic, *[TopN(u, [f"item-{u}"], [1.0], "pushrec") for u in (opener, dismisser, held)])
    )
    outbox = tmp_path / "outbox.jsonl"
    sender = PushSender(hermetic.settings(**env), hermetic.kafka, hermetic.servers.redis_url, outbox)
    sender.until_idle_s = 2.0

    async def scenario() -> None:
        running = asyncio.create_task(sender.run())
        deadline = time.monotonic() + 60
        while not (
            sender.attribution.reading and outbox.exists() and len(outbox.read_bytes().splitlines()) == 2
        ):
            assert time.monotonic() < deadline and not running.done(), "the sender never got ready"
            await asyncio.sleep(0.1)
        push_of = {p["user_id"]: p["push_id"] for p in map(orjson.loads, outbox.read_bytes().splitlines())}
        now, prefix = time.time(), hermetic.prefix
        events = [
            ("push_open", opener, f"item-{opener}", push_of[opener]),
            ("push_open", opener, f"item-{opener}", push_of[opener]),  # twice: one open
            ("click", opener, f"item-{opener}", None),  # converts
            ("purchase", opener, f"item-{opener}", None),  # the same push: no second conversion
            ("push_dismiss", dismisser, f"item-{dismisser}", push_of[dismisser]),
            ("click", dismisser, "another-item", None),  # not the pushed item
            ("push_open", dismisser, f"item-{dismisser}", "no-such-push"),  # unknown id: no error
            ("add_to_cart", held, f"item-{held}", None),  # the holdout's would-be conversion
        ]
        producer = KafkaProducer(bootstrap_servers=hermetic.servers.kafka_bootstrap)
        for k, (kind, user, item, push_id) in enumerate(events):
            record = {"event_id": f"e{k}", "type": kind, "user_id": user, "item_id": item, "ts": now + k}
            if push_id:
                record["push_id"] = push_id
            producer.send(f"{prefix}.events.{kind}", key=user.encode(), value=orjson.dumps(record))
        producer.flush()
        producer.close()
        await running

    asyncio.run(scenario())
    m = sender.metrics
    assert m.push_opens.labels("away")._value.get() == 1
    assert m.push_dismissals.labels("away")._value.get() == 1
    assert m.push_conversions.labels("away", "treated")._value.get() == 1
    assert m.push_conversions.labels("away", "holdout")._value.get() == 1
    assert m.pushes.labels("holdout")._value.get() == 1
    assert m.push_delivered.labels("away", "treated")._value.get() == 2
    assert m.push_delivered.labels("away", "holdout")._value.get() == 1


def test_a_price_drop_on_an_item_the_shopper_looked_at_is_pushed_once(
    hermetic: Hermetic, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    listed = TopN(
        "gina", ["new", "seen"], [50.0, 45.0], "pushrec", reasons=["because you viewed x", "you viewed it"]
    )
    set_prices(hermetic, Item("seen", price=100.0), Item("new", price=10.0))
    asyncio.run(write(hermetic, listed))
    run_sender(hermetic, outbox)  # she left: the new item is pushed, and she watches "seen"
    set_prices(hermetic, Item("seen", price=98.0), Item("new", price=5.0), Item("other", price=1.0))
    run_sender(hermetic, outbox)  # 2 % is no news; "new" she never looked at
    set_prices(hermetic, Item("seen", price=80.0))
    clock = Clock(time.time())
    run_at(hermetic, outbox, clock, PUSHREC_PUSH__AWAY_AFTER_S="3600")  # she counts as active
    assert len(outbox.read_bytes().splitlines()) == 1  # never while active: considered when gone
    clock.now += 3601
    sender = run_at(hermetic, outbox, clock, PUSHREC_PUSH__AWAY_AFTER_S="3600")
    set_prices(hermetic, Item("seen", price=80.0), Item("seen", price=90.0))  # same, then up: nothing
    run_sender(hermetic, outbox, PUSHREC_PUSH__MAX_PER_WINDOW="9")
    pushes = [orjson.loads(line) for line in outbox.read_bytes().splitlines()]
    assert [(p["item_id"], p["trigger"]) for p in pushes] == [("new", "away"), ("seen", "price_drop")]
    drop = pushes[1]
    assert (drop["price"], drop["old_price"], drop["reason"]) == (80.0, 98.0, "now 80 instead of 98")
    assert sender.metrics.push_decisions.labels("price_drop", "sent")._value.get() == 1

    # Switched off, a further drop is not pushed.
    set_prices(hermetic, Item("seen", price=40.0))
    run_sender(hermetic, outbox, PUSHREC_PUSH__TRIGGER_PRICE_DROP="false", PUSHREC_PUSH__MAX_PER_WINDOW="9")
    assert len(outbox.read_bytes().splitlines()) == 2
