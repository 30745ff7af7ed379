"""The event model and its codec: raw bytes become an ``Event`` or a ``BadEvent`` with a reason.

>>> ev = decode_event(b'{"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i9", "ts": 1.5}')
>>> ev.type, ev.user_id, ev.item_id, ev.ts
('click', 'u1', 'i9', 1.5)
>>> like = b'{"event_id": "e", "type": "like", "user_id": "u", "item_id": "i", "ts": 1}'
>>> decode_event(like)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stream.events.BadEvent: unknown_type: type 'like' is not one of view, click, add_to_cart, purchase, ...
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

# A shopper's interactions with items, then their answers to a push (``push_id`` says which).
PUSH_FEEDBACK_TYPES = ("push_open", "push_dismiss")
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating", *PUSH_FEEDBACK_TYPES)


class Reason(enum.StrEnum):
    """Why a record was dead-lettered; a closed set, also the metric label."""

    OVERSIZED = "oversized"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    EMPTY_ID = "empty_id"
    ID_TOO_LONG = "id_too_long"
    UNKNOWN_TYPE = "unknown_type"
    NON_FINITE = "non_finite"
    WRONG_TOPIC = "wrong_topic"


class BadEvent(ValueError):
    """A record that is not a valid event; ``reason`` is from :class:`Reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class EventLimits:
    """What a well-formed record may hold; anything outside is dead-lettered (``infra.settings``
    builds one from ``PUSHREC_EVENTS__*``). The bounds on values keep one producer's bug from
    reaching the model: a rating of 1e300 or a timestamp in milliseconds is refused here."""

    max_payload_bytes: int = 64 * 1024
    max_id_length: int = 256
    min_rating: float = 0.0
    max_rating: float = 5.0
    min_ts: float = 0.0
    max_ts: float = 4_102_444_800.0  # 2100-01-01: a millisecond timestamp (1.7e12) is far past it


DEFAULT_LIMITS = EventLimits()


@dataclass(frozen=True, slots=True)
class Event:
    """One shopper interaction."""

    event_id: str
    type: str
    user_id: str
    item_id: str
    ts: float
    rating: float | None = None
    price: float | None = None
    quantity: int | None = None
    session_id: str | None = None
    push_id: str | None = None  # push_open, push_dismiss: the push answered (its notification's)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "type": self.type,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts": self.ts,
        }
        for name in ("rating", "price", "quantity", "session_id", "push_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_ID_FIELDS = ("event_id", "user_id", "item_id")
_FLOAT_FIELDS = ("rating", "price")


class _NonFiniteLiteral(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFiniteLiteral(name)


def _classify_json_error(raw: bytes, message: str) -> BadEvent:
    """orjson said no; find out why, on this slow path only."""
    if "UTF-8" in message:
        return BadEvent(Reason.INVALID_UTF8, "payload is not valid UTF-8")
    if "infinity" in message:
        return BadEvent(Reason.NON_FINITE, "a number overflows to infinity")
    try:
        json.loads(raw, parse_constant=_reject_constant)
    except _NonFiniteLiteral as exc:
        return BadEvent(Reason.NON_FINITE, f"{exc} is not a finite number")
    except (ValueError, RecursionError):
        pass
    return BadEvent(Reason.INVALID_JSON, message.split(":")[0])


def _text(obj: dict[str, Any], name: str, max_len: int, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadEvent(Reason.MISSING_FIELD, f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise BadEvent(Reason.BAD_FIELD, f"{name} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadEvent(Reason.EMPTY_ID, f"{name} is empty")
    if len(value) > max_len:
        raise BadEvent(Reason.ID_TOO_LONG, f"{name} is {len(value)} characters (max {max_len})")
    return value


def _number(obj: dict[str, Any], name: str, required: bool) -> float | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadEvent(Reason.MISSING_FIELD, f"{name} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadEvent(Reason.BAD_FIELD, f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise BadEvent(Reason.NON_FINITE, f"{name} is not finite")
    return number


def _bounded(value: float | None, name: str, low: float, high: float, unit: str = "") -> float | None:
    if value is not None and not low <= value <= high:
        raise BadEvent(Reason.BAD_FIELD, f"{name} {value:g} is outside [{low:g}, {high:g}]{unit}")
    return value


def _load_object(raw: bytes, max_payload_bytes: int) -> dict[str, Any]:
    """The JSON object in ``raw``, or :class:`BadEvent` saying why there is none."""
    if len(raw) > max_payload_bytes:
        raise BadEvent(Reason.OVERSIZED, f"{len(raw)} bytes (max {max_payload_bytes})")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _classify_json_error(raw, str(exc)) from None
    if not isinstance(obj, dict):
        raise BadEvent(Reason.NOT_AN_OBJECT, f"top level is {type(obj).__name__}, not an object")
    return obj


def decode_event(
    raw: bytes, limits: EventLimits = DEFAULT_LIMITS, *, expected_type: str | None = None
) -> Event:
    """Parse and validate one record; raise :class:`BadEvent` for anything that is not an event.

    >>> decode_event(b'{"event_id": "e", "type": "rating", "user_id": "u", "item_id": "i", '
    ...              b'"ts": 1, "rating": 1e300}')
    Traceback (most recent call last):
    ...
    stream.events.BadEvent: bad_field: rating 1e+300 is outside [0, 5]
    >>> decode_event(b'{"event_id": "e", "type": "push_open", "user_id": "u", "item_id": "i", "ts": 1}')
    Traceback (most recent call last):
    ...
    stream.events.BadEvent: missing_field: push_id is missing
    """
    obj = _load_object(raw, limits.max_payload_bytes)

    kind = obj.get("type")
    if kind is None:
        raise BadEvent(Reason.MISSING_FIELD, "type is missing")
    if kind not in EVENT_TYPES:
        shown = repr(kind)[:40]
        raise BadEvent(Reason.UNKNOWN_TYPE, f"type {shown} is not one of {', '.join(EVENT_TYPES)}")
    if expected_type is not None and kind != expected_type:
        raise BadEvent(Reason.WRONG_TOPIC, f"a {kind} event on the {expected_type} topic")

    event_id, user_id, item_id = (_text(obj, n, limits.max_id_length, True) for n in _ID_FIELDS)
    ts = _bounded(_number(obj, "ts", True), "ts", limits.min_ts, limits.max_ts, " (seconds since the epoch)")
    rating, price = (_number(obj, n, False) for n in _FLOAT_FIELDS)
    rating = _bounded(rating, "rating", limits.min_rating, limits.max_rating)
    quantity = obj.get("quantity")
    if quantity is not None and (isinstance(quantity, bool) or not isinstance(quantity, int)):
        raise BadEvent(Reason.BAD_FIELD, f"quantity must be an integer, got {type(quantity).__name__}")
    if kind == "rating" and rating is None:
        raise BadEvent(Reason.MISSING_FIELD, "a rating event needs rating")
    session_id = _text(obj, "session_id", limits.max_id_length, False)
    # Required on a push's answer; an unknown id is no error (its exposure may be past retention).
    push_id = _text(obj, "push_id", limits.max_id_length, kind in PUSH_FEEDBACK_TYPES)
    return Event(
        event_id=event_id,  # type: ignore[arg-type]
        type=kind,
        user_id=user_id,  # type: ignore[arg-type]
        item_id=item_id,  # type: ignore[arg-type]
        ts=ts,  # type: ignore[arg-type]
        rating=rating,
        price=price,
        quantity=quantity,
        session_id=session_id,
        push_id=push_id,
    )


MAX_TEXT_LENGTH = 2_000  # title and category of a catalogue item


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue entry (``pushrec.items`` topic, ``--items`` files)."""

    item_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None


def decode_item(raw: bytes, limits: EventLimits = DEFAULT_LIMITS) -> Item:
    """Parse and validate one catalogue record; raise :class:`BadEvent` (same reasons) if it is not one.

    >>> decode_item(b'{"item_id": "1", "title": "Toy Story (1995)", "category": "Animation"}').title
    'Toy Story (1995)'
    """
    obj = _load_object(raw, limits.max_payload_bytes)
    return Item(
        item_id=_text(obj, "item_id", limits.max_id_length, True),  # type: ignore[arg-type]
        title=_text(obj, "title", MAX_TEXT_LENGTH, False),
        category=_text(obj, "category", MAX_TEXT_LENGTH, False),
        price=_number(obj, "price", False),
    )


def encode_event(event: Event) -> bytes:
    """The wire form of an event (what ``decode_event`` reads back)."""
    return orjson.dumps(event.to_dict())
