"""Why an item is on a user's list: one short reason per listed item, stored with the list and
carried by the push notification.

The reason is the user's own unfinished interest in the item, or else the item of their last
ones it is nearest to: in factor space for an item the stream knows, in text for an untouched
one from the catalogue.

>>> import numpy as np
>>> factors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
>>> reasons(np.array([1, 2]), History(rows=np.array([0, 2]), kinds={0: "purchase"}, own={2: "add_to_cart"}),
...         factors, None, np.zeros(2, dtype=bool), title={0: "red wool hat"}.get)
['because you bought red wool hat', 'it is in your cart']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

POPULAR_REASON = "popular right now"
_VERB = {
    "view": "viewed",
    "click": "clicked",
    "add_to_cart": "put in your cart",
    "purchase": "bought",
    "rating": "rated",
    "push_open": "opened in a push",
}
CART_REASON = "it is in your cart"
_OWN = {
    "view": "you viewed it",
    "click": "you clicked it",
    "add_to_cart": CART_REASON,
    "push_open": "you opened it in a push",
}
_OWN_OTHER = "you looked at it"
RESTOCK = "time to restock {}?"  # an item the user buys again (online_models.related)
# What a reason says of the item, for the push policy: new to the user, one they touched, one in
# their cart, one they bought and may buy again.
NEW, OWN, CART, RESTOCK_KIND = "new", "own", "cart", "restock"
_RESTOCK_HEAD, _RESTOCK_TAIL = RESTOCK.split("{}")


def reason_kind(reason: str) -> str:
    """What ``reason`` says of its item.

    >>> [reason_kind(r) for r in ("it is in your cart", "you viewed it", "time to restock tea?", "popular")]
    ['cart', 'own', 'restock', 'new']
    """
    if reason == CART_REASON:
        return CART
    if reason in _OWN.values() or reason == _OWN_OTHER:
        return OWN
    if reason.startswith(_RESTOCK_HEAD) and reason.endswith(_RESTOCK_TAIL):
        return RESTOCK_KIND
    return NEW


@dataclass(frozen=True, slots=True)
class History:
    """What a user did lately: their last item rows (newest first), the event type of each, and
    the touched, unconsumed items they may still want (row -> last event type)."""

    rows: np.ndarray
    kinds: Mapping[int, str]
    own: Mapping[int, str]


def reasons(
    listed: np.ndarray,
    history: History,
    factors: np.ndarray,
    text: Callable[[np.ndarray], np.ndarray] | None,
    cold: np.ndarray,
    title: Callable[[int], str | None],
) -> list[str]:
    """One reason per row of ``listed``; ``cold[k]``: listed[k] is untouched (explained by text:
    ``text(rows)`` gives their embeddings); ``title(row)`` names an item (None: its row is shown)."""
    rows = listed.tolist()
    # Only the rows that are not the user's own need their nearest history item (on a log of
    # views, three in four listed rows are the user's own); the untouched ones, by their text.
    others = np.array([k for k, row in enumerate(rows) if row not in history.own], dtype=np.int64)
    by_text = cold[others] if text is not None else np.zeros(others.size, dtype=bool)
    nearest = np.zeros(len(rows), dtype=np.int64)
    if not by_text.all():
        at = others[~by_text]
        nearest[at] = _nearest(factors[listed[at]], factors[history.rows])
    if by_text.any():
        assert text is not None
        at = others[by_text]
        nearest[at] = _nearest(text(listed[at]), text(history.rows))
    out = []
    for k, row in enumerate(rows):
        if row in history.own:
            out.append(_OWN.get(history.own[row], _OWN_OTHER))
            continue
        seen = int(history.rows[nearest[k]])
        verb = _VERB.get(history.kinds.get(seen, "view"), "viewed")
        name = title(seen) or str(seen)
        out.append(f"new, like {name} you {verb}" if cold[k] else f"because you {verb} {name}")
    return out


def _nearest(items: np.ndarray, history: np.ndarray) -> np.ndarray:
    """For each row of ``items``, the index of the ``history`` row with the highest cosine.

    An item's own length scales its whole row of cosines, so only the history is normalised."""
    norms = np.sqrt(np.einsum("ij,ij->i", history, history))
    return np.argmax((items @ history.T) / np.where(norms > 0, norms, 1.0), axis=1)
