"""What a shopper's history adds to their list beyond factors: the items that go with their last
ones (``online_models.covisit``) and the items they bought that shoppers buy again
(``online_models.rebuy``), with the reasons they are listed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from online_models.covisit import CoVisitation
from online_models.explain import RESTOCK, History
from online_models.rebuy import BuyingAgain
from online_models.user_state import UserState

_EMPTY_ROWS = np.empty(0, dtype=np.int64)
_EMPTY = np.empty(0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Related:
    """One shopper's rule candidates and returning purchases."""

    covisit_rows: np.ndarray
    covisit_scores: np.ndarray  # (0, 1]
    again_rows: np.ndarray
    again_scores: np.ndarray  # this shopper's chance of buying it again, (0, 1]
    not_again: np.ndarray  # the rest of the shopper's purchases

    @property
    def rows(self) -> list[int]:
        """Every row this adds (candidates the approximate index must not miss)."""
        return [*self.covisit_rows.tolist(), *self.again_rows.tolist()]

    def excluded(self, consumed: set[int] | frozenset[int]) -> np.ndarray:
        """The ``consumed`` rows that stay out (all but those bought again), as an array."""
        if len(consumed) == len(self.again_rows) + len(self.not_again):  # every purchase is consumed:
            return self.not_again  # nothing else was (no set of a grocery shopper's hundreds of rows)
        out = consumed - set(self.again_rows.tolist()) if len(self.again_rows) else consumed
        return np.fromiter(out, dtype=np.int64, count=len(out))

    def explain(
        self,
        listed: list[int],
        out: list[str],
        history: History,
        name: Callable[[int], str],
        sources: Callable[[list[int]], list[int]],
    ) -> None:
        """Replace the reasons (``out``, one per ``listed`` row) of the rows this put there;
        ``sources(rows)`` names the last item each strong rule came from most."""
        again = set(self.again_rows.tolist())
        strong = set(self.covisit_rows[self.covisit_scores >= 0.5].tolist())
        ruled = []
        for k, row in enumerate(listed):
            if row in again:
                out[k] = RESTOCK.format(name(row))
            elif row in strong and row not in history.own:
                ruled.append(k)
        for k, source in zip(ruled, sources([listed[k] for k in ruled]), strict=True):
            bought = history.kinds.get(source) == "purchase"
            out[k] = f"{'often bought after' if bought else 'viewed together with'} {name(source)}"


def related(state: UserState, covisit: CoVisitation | None, rebuy: BuyingAgain | None) -> Related:
    """``state``'s rule candidates (``covisit`` None: off) and returning purchases (``rebuy``
    None: off)."""
    rows, scores = covisit.scores(state.session) if covisit else (_EMPTY_ROWS, _EMPTY)
    again_rows, again, not_again = _EMPTY_ROWS, _EMPTY, _EMPTY_ROWS
    if rebuy is not None and state.bought:
        bought, counts = state.purchases()
        # This shopper's chance of buying each again: of their purchases of it, all but the first
        # repeated one; the item's repeat share counts as one more purchase (their first
        # purchase of an item scores its share; a second, at least one half).
        chance = (counts - 1 + rebuy.shares(bought)) / counts
        keep = chance >= rebuy.min_share
        again_rows, again = bought[keep], chance[keep]
        not_again = bought[~keep]
    return Related(rows, scores, again_rows, again, not_again)


def add_at(scores: np.ndarray, rows: np.ndarray | None, touched: np.ndarray, values: np.ndarray) -> None:
    """``scores[touched] += values``, where ``scores`` holds ``rows`` (sorted; None: every row)."""
    if not len(touched) or (rows is not None and not len(rows)):
        return
    if rows is not None:
        at, present = locate(rows, touched)
        touched, values = at[present], values[present]
    scores[touched] += values.astype(np.float32)


def locate(rows: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` sits among ``rows`` (sorted, not empty), and whether it is there."""
    at = np.minimum(np.searchsorted(rows, wanted), len(rows) - 1)
    return at, rows[at] == wanted
