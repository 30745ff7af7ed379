"""Every user the recommender holds: their state (``online_models.user_state``), the partition
their events come from, which of them changed since a checkpoint began, and their checkpoint
form, histories and factors, that travels between workers (rows are one worker's numbering, so
the rows a history names go with their item ids)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import orjson

from online_models.mf import ImplicitMF, ItemIndex
from online_models.user_state import UserState

_SHARD_USERS = 1024  # users per snapshot dict, so that growing one copies at most that many


class UserSnapshot:
    """Users' state written a few at a time while learning goes on (see
    :meth:`UserTable.write`): each history as a JSON fragment, each factor vector a copy.

    Held in many small dicts (a user's shard is their hash's), sized for ``users``: growing
    one dict of a hundred thousand users copies it whole and stopped the event loop for tens of
    milliseconds at a million users."""

    def __init__(self, users: int = 0) -> None:
        shards = max(1, -(-users // _SHARD_USERS))
        self.histories: list[dict[str, Any]] = [{} for _ in range(shards)]
        self.factors: list[dict[str, np.ndarray]] = [{} for _ in range(shards)]
        self.rows: set[int] = set()

    def put(self, user: str, history: Any, vector: np.ndarray | None) -> None:
        shard = hash(user) % len(self.histories)
        self.histories[shard][user] = history
        if vector is None:
            self.factors[shard].pop(user, None)
        else:
            self.factors[shard][user] = vector

    def remove(self, user: str) -> None:
        shard = hash(user) % len(self.histories)
        self.histories[shard].pop(user, None)
        self.factors[shard].pop(user, None)

    # The checkpoint form is built a shard at a time, never as a list of every user: a young
    # list of a hundred thousand objects made each collection of the young generation scan it
    # (tens of milliseconds, in whichever thread allocated). It is JSON in runs of members (a
    # shard each, without brackets), to be written one after the other, never joined.

    def history_members(self) -> list[bytes]:
        """Every history, as runs of the members (user: history) of one JSON object."""
        return [orjson.dumps(shard)[1:-1] for shard in self.histories if shard]

    def factor_user_members(self) -> list[bytes]:
        """The users with factors, as runs of the members of one JSON list, in the order of
        :meth:`factor_matrix`."""
        return [orjson.dumps(list(shard))[1:-1] for shard in self.factors if shard]

    def factor_matrix(self, n_factors: int) -> np.ndarray:
        out = np.empty((sum(map(len, self.factors)), n_factors), dtype=np.float64)
        at = 0
        for shard in self.factors:
            if shard:
                out[at : at + len(shard)] = list(shard.values())
                at += len(shard)
        return out

    def clear(self) -> None:
        """Let go of what was written, a shard at a time."""
        for shard in (*self.histories, *self.factors):
            shard.clear()


class UserTable:
    """The users' states; their factors live in ``mf`` (River's), their rows in ``items``."""

    def __init__(self, mf: ImplicitMF, items: ItemIndex, session_items: int, half_life_s: float) -> None:
        self.mf, self.items = mf, items
        self.session_items, self.half_life_s = session_items, half_life_s
        self._states: dict[str, UserState] = {}
        # Users whose state changed since track_changes (None: not tracking).
        self._changed: set[str] | None = None

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def get(self, user: str) -> UserState | None:
        return self._states.get(user)

    def touch(self, user: str) -> UserState:
        """The user's state, created if new, noted as changed (learning is about to change it)."""
        if self._changed is not None:
            self._changed.add(user)
        state = self._states.get(user)
        if state is None:
            state = self._states[user] = UserState()
        return state

    def holds(self, user: str) -> bool:
        return user in self._states or user in self.mf

    def ids(self) -> list[str]:
        """Every user held (a copy)."""
        return list(self._states)

    def place(self, user: str, partition: int) -> None:
        """The partition the user's events come from: their state is checkpointed with it."""
        state = self._states.get(user)
        if state is not None:
            state.partition = partition

    def partition_of(self, user: str) -> int:
        """The partition of :meth:`place` (-1: unknown user or partition)."""
        state = self._states.get(user)
        return state.partition if state is not None else -1

    def in_partition(self, partition: int) -> list[str]:
        return [user for user, state in self._states.items() if state.partition == partition]

    def drop(self, users: Iterable[str]) -> bool:
        """Let go of these users: history and factors (partition moved, or forgotten); whether
        any was held."""
        held = False
        for user in users:
            if self._changed is not None:
                self._changed.add(user)
            held = (self._states.pop(user, None) is not None) | self.mf.forget(user) | held
        return held

    def track_changes(self) -> set[str]:
        """From now on, add to the returned set every user whose state changes (a new set each
        call; :meth:`untrack_changes` stops)."""
        self._changed = set()
        return self._changed

    def untrack_changes(self) -> None:
        self._changed = None

    # --- the checkpoint form -------------------------------------------------------------------

    def state(self, users: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The state of ``users``: histories, factors, and the item ids of the rows they name."""
        factor_users, arrays = self.mf.user_state(users)
        written, rows = {}, set()
        for user in users:
            state = self._states.get(user)
            if state is not None:
                written[user] = state.to_json()
                rows |= state.rows()
        return {"users": written, "factor_users": factor_users, **self._item_ids(rows)}, arrays

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], partition: int = -1) -> None:
        """Add the users of :meth:`state`, as coming from ``partition``."""
        # Checkpoints before 2026-12-01 list the factor users under "mf".
        factor_users = meta["factor_users"] if "factor_users" in meta else meta["mf"]["users"]
        self.mf.restore_users(factor_users, arrays)
        # Items by id: the worker that wrote them numbered its rows its own way (older
        # checkpoints wrote this worker's rows).
        row_of: Callable[[int], int] = int
        if "item_ids" in meta:
            pairs = zip(meta["item_rows"], meta["item_ids"], strict=True)
            row_of = {row: self.items.add(item) for row, item in pairs}.__getitem__
        for user, data in meta["users"].items():
            state = UserState.from_json(data, self.session_items, self.half_life_s, row_of)
            state.partition = partition
            self._states[user] = state
            if self._changed is not None:
                self._changed.add(user)

    def write(self, users: Iterable[str], partition: int, snapshot: UserSnapshot) -> None:
        """Write the current state of those of ``users`` that belong to ``partition`` into
        ``snapshot``, and take out those that do not (any more)."""
        for user in users:
            state = self._states.get(user)
            if state is None or state.partition != partition:
                snapshot.remove(user)
                continue
            snapshot.rows |= state.rows()
            history = orjson.Fragment(orjson.dumps(state.to_json()))
            snapshot.put(user, history, self.mf.user_vector(user, copy=True))

    def snapshot_state(self, snapshot: UserSnapshot) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """:meth:`state`'s form of a snapshot written by :meth:`write`; its users and factor
        users as runs of JSON members (:meth:`UserSnapshot.history_members`)."""
        meta = {
            "users": snapshot.history_members(),
            "factor_users": snapshot.factor_user_members(),
            **self._item_ids(snapshot.rows),
        }
        return meta, {"user_factors": snapshot.factor_matrix(self.mf.n_factors)}

    def _item_ids(self, rows: set[int]) -> dict[str, list[Any]]:
        named = sorted(rows)
        ids = self.items.ids
        return {"item_rows": named, "item_ids": [ids[row] for row in named]}
