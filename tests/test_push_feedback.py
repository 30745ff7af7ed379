"""Answers to a push (push_open, push_dismiss): decoded like every event, learned by the model."""

from __future__ import annotations

import random

import pytest

from online_models.pipeline import RefreshPipeline
from online_models.recommender import Recommender
from stream.events import BadEvent, Reason, decode_event, encode_event


def _event(kind: str, **extra: object) -> bytes:
    import orjson

    return orjson.dumps({"event_id": "e1", "type": kind, "user_id": "u", "item_id": "i", "ts": 5.0, **extra})


@pytest.mark.parametrize("kind", ["push_open", "push_dismiss"])
def test_push_answers_carry_their_push_id(kind: str) -> None:
    event = decode_event(_event(kind, push_id="u:17:away"))
    assert (event.type, event.push_id) == (kind, "u:17:away")
    assert decode_event(encode_event(event)) == event
    with pytest.raises(BadEvent) as missing:
        decode_event(_event(kind))
    assert missing.value.reason is Reason.MISSING_FIELD
    with pytest.raises(BadEvent) as bad:
        decode_event(_event(kind, push_id=7))
    assert bad.value.reason is Reason.BAD_FIELD


def test_an_unknown_push_id_is_not_an_error() -> None:
    """The exposure may be older than the log's retention: the codec cannot and does not check it."""
    assert decode_event(_event("push_open", push_id="never-seen")).push_id == "never-seen"


def _trained() -> tuple[Recommender, float]:
    model, rng, ts = Recommender(seed=3), random.Random(0), 0.0
    items = [f"i{k}" for k in range(60)]
    for user in range(40):
        for _ in range(15):
            ts += 1.0
            model.learn_one(f"u{user}", rng.choice(items), "click", ts)
    return model, ts


def _score(model: Recommender, user: str, item: str) -> float:
    top = model.recommend(user, n=len(model.items))
    return dict(zip(top.items, top.scores, strict=True))[item]


def test_an_opened_item_rises_and_a_dismissed_one_falls_for_that_shopper() -> None:
    model, ts = _trained()
    user = "u3"
    touched = model.users.get(user)
    assert touched is not None
    own = model.items.ids[touched.interest_rows[-1]]  # an item they clicked: high on their list
    untouched = next(i for i in model.items.ids if i != own and i not in model.recommend(user, n=5).items)
    opened_before, dismissed_before, other = _score(model, user, untouched), _score(model, user, own), "u4"
    other_before = _score(model, other, own)
    model.learn_one(user, untouched, "push_open", ts + 1)
    model.learn_one(user, own, "push_dismiss", ts + 2)
    assert _score(model, user, untouched) > opened_before + 10  # now their own interest
    assert _score(model, user, own) < dismissed_before - 10  # their interest in it is gone
    assert abs(_score(model, other, own) - other_before) < 1  # the item's factors move one step
    listed = model.recommend(user, explain=True)
    assert listed.reasons[listed.items.index(untouched)] == "you opened it in a push"


def test_a_dismissal_of_an_unknown_shopper_or_item_changes_nothing() -> None:
    model, ts = _trained()
    before = model.recommend("u1").scores
    model.learn_one("stranger", "i1", "push_dismiss", ts + 1)
    model.learn_one("u1", "no-such-item", "push_dismiss", ts + 1)
    assert model.users.get("stranger") is None and "no-such-item" not in model.items
    assert model.recommend("u1").scores == before


def test_push_answers_are_learned_but_not_judged_as_visits() -> None:
    """An open is of an item the list held (the push came from it): counting it as a hit would
    flatter the prequential hit rate."""
    from types import SimpleNamespace as Ev

    pipeline = RefreshPipeline(Recommender(seed=1))
    pipeline.learn([Ev(user_id="u", item_id="a", type="click", ts=1.0, rating=None)])
    pipeline.refresh(["u"])
    observed = len(pipeline.hit_rate._hits)
    pipeline.learn([Ev(user_id="u", item_id="a", type="push_open", ts=2.0, rating=None)])
    assert len(pipeline.hit_rate._hits) == observed
    assert pipeline.recommender.users.get("u").events == 2
