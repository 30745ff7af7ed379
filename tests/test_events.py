"""Codec: every byte string either parses or raises BadEvent with a reason from the closed set."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.events import EVENT_TYPES, BadEvent, Event, EventLimits, Reason, decode_event, encode_event

VALID = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.5}


def raw(**changes: object) -> bytes:
    obj = {**VALID, **changes}
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def test_valid_event_round_trips() -> None:
    event = decode_event(raw(price=2.5, quantity=3, session_id="s"))
    assert event == Event("e1", "click", "u1", "i1", 1.5, price=2.5, quantity=3, session_id="s")
    assert decode_event(encode_event(event)) == event


# The malformed-record corpus: each case and the reason it must be dead-lettered with.
CORPUS = [
    (b"not json at all", Reason.INVALID_JSON),
    (raw()[:-5], Reason.INVALID_JSON),  # truncated
    (b"[1, 2, 3]", Reason.NOT_AN_OBJECT),
    (b'"a string"', Reason.NOT_AN_OBJECT),
    (b"null", Reason.NOT_AN_OBJECT),
    (raw(user_id=...), Reason.MISSING_FIELD),
    (raw(type=...), Reason.MISSING_FIELD),
    (raw(ts=...), Reason.MISSING_FIELD),
    (raw(user_id=""), Reason.EMPTY_ID),
    (raw(item_id="   "), Reason.EMPTY_ID),
    (raw(user_id=17), Reason.BAD_FIELD),
    (raw(ts="yesterday"), Reason.BAD_FIELD),
    (raw(ts=True), Reason.BAD_FIELD),
    (raw(price="cheap"), Reason.BAD_FIELD),
    (raw(quantity=1.5), Reason.BAD_FIELD),
    (raw(type="like"), Reason.UNKNOWN_TYPE),
    (raw(type=["click"]), Reason.UNKNOWN_TYPE),
    (raw(type="rating"), Reason.MISSING_FIELD),  # a rating event without its rating
    (raw().replace(b"1.5", b"NaN"), Reason.NON_FINITE),
    (raw().replace(b"1.5", b"-Infinity"), Reason.NON_FINITE),
    (raw().replace(b"1.5", b"1e999"), Reason.NON_FINITE),
    (b'{"event_id": "\xff\xfe", "type": "click"}', Reason.INVALID_UTF8),
    (b"[" * 5000 + b"]" * 5000, Reason.INVALID_JSON),  # deeply nested
    (raw(user_id="u" * 300), Reason.ID_TOO_LONG),
    (raw(session_id="s" * 300), Reason.ID_TOO_LONG),
    (raw(extra="x" * 70_000), Reason.OVERSIZED),
    # Values no shop sends (issue 19, item 6: one rating of 1e300 poisoned every list).
    (raw(type="rating", rating=1e300), Reason.BAD_FIELD),
    (raw(type="rating", rating=-3), Reason.BAD_FIELD),
    (raw(type="rating", rating=1e9), Reason.BAD_FIELD),
    (raw(ts=1_700_000_000_000), Reason.BAD_FIELD),  # milliseconds
    (raw(ts=-1.0), Reason.BAD_FIELD),
]


@pytest.mark.parametrize(
    ("payload", "reason"), CORPUS, ids=[c[1].value + f"-{i}" for i, c in enumerate(CORPUS)]
)
def test_malformed_records_get_their_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(BadEvent) as info:
        decode_event(payload)
    assert info.value.reason is reason


def test_event_on_the_wrong_topic_is_rejected() -> None:
    with pytest.raises(BadEvent) as info:
        decode_event(raw(type="purchase"), expected_type="click")
    assert info.value.reason is Reason.WRONG_TOPIC


def test_limits_are_configurable() -> None:
    with pytest.raises(BadEvent) as info:
        decode_event(raw(), EventLimits(max_payload_bytes=20))
    assert info.value.reason is Reason.OVERSIZED
    with pytest.raises(BadEvent) as info:
        decode_event(raw(user_id="abcd"), EventLimits(max_id_length=3))
    assert info.value.reason is Reason.ID_TOO_LONG
    stars = EventLimits(min_rating=1.0)
    assert decode_event(raw(type="rating", rating=1.0), stars).rating == 1.0
    with pytest.raises(BadEvent, match=r"rating 0 is outside \[1, 5\]"):
        decode_event(raw(type="rating", rating=0), stars)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_bad_event(payload: bytes) -> None:
    try:
        event = decode_event(payload)
    except BadEvent as bad:
        assert bad.reason in set(Reason)
    else:
        assert event.type in EVENT_TYPES and event.user_id and event.item_id
        assert math.isfinite(event.ts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.fixed_dictionaries({}, optional={k: json_values for k in (*VALID, "rating", "price", "quantity")}))
def test_any_json_object_parses_or_raises_bad_event(obj: dict) -> None:
    try:
        payload = orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return
    try:
        event = decode_event(payload)
    except BadEvent as bad:
        assert bad.reason in set(Reason)
    else:
        assert decode_event(encode_event(event)) == event


def test_a_paced_replay_keeps_its_rate_and_sleeps_once_per_tick_not_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 10,000 events a second for 1,000 events (a fake clock: sending one takes 20 µs), the
    replay ends on time and sleeps about once per 2 ms, not once per event."""
    from stream import replay

    clock = {"now": 0.0, "sleeps": 0}

    def monotonic() -> float:
        clock["now"] += 20e-6
        return clock["now"]

    def sleep(seconds: float) -> None:
        clock["now"] += seconds
        clock["sleeps"] += 1

    monkeypatch.setattr(replay.time, "monotonic", monotonic)
    monkeypatch.setattr(replay.time, "sleep", sleep)
    pacing = replay.Pacing(rate=10_000)
    sent_at = []
    for _ in range(1000):
        pacing.wait(0.0)
        sent_at.append(clock["now"])
    assert sent_at[-1] >= 999 / 10_000 - replay._TICK_S  # not ahead of its rate by more than a tick
    assert sent_at[-1] <= 0.1 + 0.01
    assert 25 <= clock["sleeps"] <= 0.1 / replay._TICK_S + 1
