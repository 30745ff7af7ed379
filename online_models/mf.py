"""Online matrix factorisation for implicit feedback: River's FunkMF, guarded and vectorised.

River keeps factors in ``defaultdict``s, so scoring an unknown id would insert a random vector.
Here only ``learn_one`` touches River; scoring reads a contiguous float32 item matrix that is
kept in sync row by row, and checks membership before it looks up a user. The matrix is stored
factor-major (one contiguous run of every item's value per factor): a 41k x 16 product then
costs ~24 µs instead of ~65-100 µs item-major (BLAS handles many short rows badly).

>>> mf = ImplicitMF(n_factors=4, seed=1)
>>> for _ in range(50):
...     _ = mf.learn_one("alice", "apple", weight=1.0, negatives=["pear"])
>>> s = mf.score_many("alice")
>>> bool(s[mf.items.row("apple")] > s[mf.items.row("pear")])
True
>>> mf.score_many("nobody") is None, "nobody" in mf
(True, False)

No update may leave a factor non-finite or past ``MAX_FACTOR_NORM``: such an update is undone
and counted, whatever its input.

>>> mf.learn_one("alice", "apple", weight=1e300), mf.refused
(False, 1)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from river import optim, reco

# Largest confidence one event may carry (the settings' type weights stay within it).
MAX_WEIGHT = 10.0
# Largest norm a factor vector may reach. The shared logs' largest is 3.5 (users and items,
# default settings); an update past this is a bad input or a learning rate that diverges.
MAX_FACTOR_NORM = 100.0
_MAX_SQUARED_NORM = MAX_FACTOR_NORM**2


class ItemIndex:
    """Item id <-> dense row number; rows are never reused, so arrays indexed by row stay valid."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item: object) -> bool:
        return item in self._rows

    def row(self, item: str) -> int:
        return self._rows[item]

    def find(self, item: str) -> int | None:
        """The item's row, or None for an item never seen."""
        return self._rows.get(item)

    def add(self, item: str) -> int:
        row = self._rows.get(item)
        if row is None:
            row = self._rows[item] = len(self.ids)
            self.ids.append(item)
        return row

    def restore(self, ids: list[str]) -> None:
        self.ids = list(ids)
        self._rows = {item: row for row, item in enumerate(self.ids)}


class ImplicitMF:
    """Logistic matrix factorisation learned one positive (plus sampled negatives) at a time."""

    def __init__(
        self,
        n_factors: int = 32,
        learning_rate: float = 0.05,
        l2: float = 0.001,
        seed: int = 42,
        items: ItemIndex | None = None,
        loss: str = "log",
    ) -> None:
        """``loss``: "log" (logistic, confidence-weighted positives) or "squared" (FunkMF's default)."""
        self.items = items if items is not None else ItemIndex()
        self._logistic = loss == "log"
        self._negative_loss = optim.losses.Log() if self._logistic else optim.losses.Squared()
        self._mf = reco.FunkMF(
            n_factors=n_factors,
            optimizer=optim.SGD(learning_rate),
            loss=self._negative_loss,
            l2=l2,
            initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        self.n_factors = n_factors
        self.seed = seed
        self._initial_tables = np.random.default_rng([seed, 0x17E4]).normal(
            0.0, 0.1 / math.sqrt(3), (3, 1024, n_factors)
        )
        # Item factors as they were when change tracking last started (see take_item_changes);
        # None while not tracking.
        self._base: dict[str, np.ndarray] | None = None
        # Items seeded (seed_items) since then: their first factors, which the group cannot derive
        # from the id as it does initial_vector's (a text prediction is this worker's own).
        self._starts: dict[str, np.ndarray] = {}
        # One positive loss whose weight is set per event (a cache per weight would let a
        # producer grow the worker's memory one distinct rating at a time).
        self._weighted_log = optim.losses.Log()
        self._positive_loss = self._weighted_log if self._logistic else self._negative_loss
        self.refused = 0  # updates undone by the guard (see learn_one)
        self._matrix = np.zeros((n_factors, 1024), dtype=np.float32)  # factor-major: see above
        self._view = np.empty((0, n_factors), dtype=np.float32)  # item_matrix's last view

    def __contains__(self, user: object) -> bool:
        return user in self._mf.u_latents

    def has_factors(self, item: str) -> bool:
        """Whether the item has factors of its own (learned here or from the group, or seeded
        before its first event), not only a scoring row."""
        return item in self._mf.i_latents

    def learn_one(
        self, user: str, item: str, weight: float, negatives: Iterable[str] = (), liked: bool = True
    ) -> bool:
        """One positive ``(user, item)`` of confidence ``weight``, and a negative per sampled item;
        ``liked=False``: ``item`` is a negative too (a dismissed push).

        Refused (False, counted in :attr:`refused`, nothing changed) when ``weight`` is not in
        [0, ``MAX_WEIGHT``] or the step would leave a touched factor non-finite or longer than
        ``MAX_FACTOR_NORM``: one bad event must not poison every score."""
        touched = [item, *(n for n in negatives if n != item)]
        if not 0.0 <= weight <= MAX_WEIGHT:  # also False for NaN
            self.refused += 1
            return False
        users, items = self._mf.u_latents, self._mf.i_latents
        new = [name for name in touched if name not in items]
        for name in new:  # before River draws one from its own generator
            items[name] = self.initial_vector(name)
        before = {name: items[name].copy() for name in touched}
        if self._base is not None:
            for name in touched:
                self._base.setdefault(name, before[name])
        user_before = users[user].copy() if user in users else None
        # River's Log loss takes labels in {0, 1}; the confidence rides on its positive weight.
        self._weighted_log.weight_pos = weight
        if liked:
            self._mf.loss = self._positive_loss
            self._mf.learn_one(user, item, True)
        self._mf.loss = self._negative_loss
        for negative in touched[1:] if liked else touched:
            self._mf.learn_one(user, negative, False)
        if _sane(users[user]) and all(_sane(items[name]) for name in touched):
            for name in touched:
                self._sync(name)
            return True
        self.refused += 1
        if user_before is None:
            del users[user]
        else:
            users[user] = user_before
        for name in touched:
            items[name] = before[name]
        for name in new:
            del items[name]
            if self._base is not None:
                self._base.pop(name, None)
        return False

    def initial_vector(self, item: str) -> np.ndarray:
        """An item's first factors: a function of the seed and the item id alone, so every worker
        (or shard) starts an item at the same vector and their changes to it add up. The sum of
        one row from each of three seeded tables picked by 30 bits of the id's CRC: N(0, 0.1²)
        like River's initializer, ~1.5 µs instead of ~8 µs for a generator seeded per item."""
        key = zlib.crc32(item.encode("utf-8", "surrogatepass"))
        tables = self._initial_tables
        return tables[0, key & 1023] + tables[1, (key >> 10) & 1023] + tables[2, (key >> 20) & 1023]

    def split_streams(self, shard: int) -> None:
        """New users' first factors from a generator of this shard's own (items keep theirs)."""
        self._initializer_rng().seed([self.seed, shard])

    def track_item_changes(self) -> None:
        """From now on remember each item's factors before its first change (take_item_changes)."""
        self._base = {}
        self._starts = {}

    @property
    def changed_vectors(self) -> int:
        """Vectors :meth:`take_item_changes` would return: a delta per item changed since tracking
        started or the last take, and a start per item seeded since."""
        return len(self._base) + len(self._starts) if self._base is not None else 0

    def take_item_changes(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """What learning added to each item's factors since tracking started or the last call,
        and the first factors of the items seeded since (see :meth:`add_item_deltas`)."""
        if self._base is None:
            return {}, {}
        items = self._mf.i_latents
        deltas = {name: items[name] - base for name, base in self._base.items()}
        starts, self._base, self._starts = self._starts, {}, {}
        return deltas, starts

    def add_item_deltas(
        self, deltas: Mapping[str, np.ndarray], starts: Mapping[str, np.ndarray] | None = None
    ) -> list[int]:
        """Add what another worker's learning changed (an item new here starts where it started
        there: its seeded factors in ``starts``, else :meth:`initial_vector`); their rows. Items
        whose own changes are tracked keep them: the addition moves their base too, so it is not
        taken as one's own."""
        items, base, starts = self._mf.i_latents, self._base, starts or {}
        rows = []
        for name, delta in deltas.items():
            if name in items:
                start = items[name]
            else:
                start = starts[name] if name in starts else self.initial_vector(name)
            items[name] = start + delta
            if base is not None and name in base:
                base[name] = base[name] + delta
            rows.append(self._sync(name))
        return rows

    def discard_item_changes(self) -> list[int]:
        """Undo what learning changed since tracking started or the last take; their rows."""
        if not self._base:
            return []
        items, rows = self._mf.i_latents, []
        for name, before in self._base.items():
            items[name] = before
            rows.append(self._sync(name))
        self._base, self._starts = {}, {}
        return rows

    def set_items(self, vectors: Mapping[str, np.ndarray]) -> list[int]:
        """Overwrite (or add) items' factors, e.g. the group's merged item state; their rows."""
        items = self._mf.i_latents
        rows = []
        for name, vector in vectors.items():
            items[name] = np.array(vector, dtype=np.float64)
            rows.append(self._sync(name))
        return rows

    def user_vector(self, user: str, copy: bool = False) -> np.ndarray | None:
        """The user's factors as float32 (``copy``: as held, float64), or None for a cold user."""
        latents = self._mf.u_latents
        if user not in latents:
            return None
        return latents[user].copy() if copy else latents[user].astype(np.float32)

    def score_many(self, user: str) -> np.ndarray | None:
        """Scores of every known item for ``user`` (row order), or None for a cold user."""
        vector = self.user_vector(user)
        if vector is None:
            return None
        return self.item_matrix() @ vector

    def item_matrix(self) -> np.ndarray:
        """The current item factors, one row per item of :attr:`items` (a read-only view)."""
        view = self._view
        if view.shape[0] != len(self.items) or view.base is not self._matrix:  # new items or grown
            self._reserve(len(self.items))
            view = self._view = self._matrix[:, : len(self.items)].T
            view.flags.writeable = False
        return view

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything learned, as JSON-able metadata and arrays (no pickle): the factors of every
        user and item River holds, and the state of the initializer's random generator."""
        meta, arrays = self.item_state()
        users, user_arrays = self.user_state([str(user) for user in self._mf.u_latents])
        return {**meta, "users": users}, {**arrays, **user_arrays}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state` into this (freshly built, identically configured) model."""
        self.restore_items(meta, arrays)
        self._mf.u_latents.clear()
        self.restore_users(meta["users"], arrays)

    def item_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The item factors and the initializer's random generator (what no user owns)."""
        items = self._mf.i_latents
        rng_kind, keys, position, has_gauss, cached = self._initializer_rng().get_state()
        meta = {"items": list(items), "rng": [rng_kind, int(position), int(has_gauss), float(cached)]}
        return meta, {"item_factors": _stack(items.values(), self.n_factors), "rng_keys": np.asarray(keys)}

    def restore_items(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`item_state`; user factors are left as they are."""
        items = self._mf.i_latents
        items.clear()
        items.update(zip(meta["items"], np.array(arrays["item_factors"], dtype=np.float64), strict=True))
        rng_kind, position, has_gauss, cached = meta["rng"]
        self._initializer_rng().set_state((rng_kind, arrays["rng_keys"], position, has_gauss, cached))
        self._matrix = np.zeros((self.n_factors, max(1024, len(self.items))), dtype=np.float32)
        for item in meta["items"]:
            self._sync(item)

    def user_state(self, users: Iterable[str]) -> tuple[list[str], dict[str, np.ndarray]]:
        """The factors of those of ``users`` that have some: their ids, and one array row each."""
        latents = self._mf.u_latents
        present = [user for user in users if user in latents]
        return present, {"user_factors": _stack((latents[user] for user in present), self.n_factors)}

    def restore_users(self, users: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Add the users of :meth:`user_state` (replacing any factors they had here)."""
        factors = np.array(arrays["user_factors"], dtype=np.float64)
        self._mf.u_latents.update(zip(users, factors, strict=True))

    def seed_items(self, items: Sequence[str], factors: np.ndarray | Sequence[np.ndarray]) -> int:
        """Give items factors before their first interaction (a cold-start prediction, or a
        synthetic catalogue); items that already have factors keep theirs. Returns how many."""
        latents = self._mf.i_latents
        new = [(item, vector) for item, vector in zip(items, factors, strict=True) if item not in latents]
        if not new:
            return 0
        rows = np.fromiter((self.items.add(item) for item, _ in new), dtype=np.int64, count=len(new))
        vectors = np.array([vector for _, vector in new], dtype=np.float64)
        latents.update(zip((item for item, _ in new), vectors, strict=True))
        if self._base is not None:  # a prediction, not learning: its change to share is from here
            for (item, _), vector in zip(new, vectors, strict=True):
                self._base[item] = self._starts[item] = vector.copy()
        self._reserve(int(rows.max()) + 1)
        self._matrix[:, rows] = vectors.T
        return len(new)

    def set_rows(self, rows: np.ndarray, factors: np.ndarray) -> None:
        """Overwrite the scoring rows of items River does not hold (predicted factors of cold
        items); River's own factors are untouched."""
        self._reserve(int(rows.max()) + 1 if rows.size else 0)
        self._matrix[:, rows] = factors.T

    def forget(self, user: str) -> bool:
        """Drop the user's factors; False if there were none."""
        return self._mf.u_latents.pop(user, None) is not None

    def _initializer_rng(self) -> np.random.RandomState:
        # River's Normal initializer draws every new factor from it (River does not type it).
        return self._mf.initializer._rng  # type: ignore[attr-defined,no-any-return]

    def _sync(self, item: str) -> int:
        row = self.items.add(item)
        self._reserve(row + 1)
        self._matrix[:, row] = self._mf.i_latents[item]
        return row

    def _reserve(self, rows: int) -> None:
        """Grow the matrix (doubling) so it holds ``rows`` rows; unlearned rows stay zero."""
        size = self._matrix.shape[1]
        if rows > size:
            grown = np.zeros((self.n_factors, max(rows, 2 * size)), dtype=np.float32)
            grown[:, :size] = self._matrix
            self._matrix = grown


def _sane(vector: np.ndarray) -> bool:
    return float(vector @ vector) <= _MAX_SQUARED_NORM  # False for NaN and inf


def _stack(vectors: Iterable[np.ndarray], n_factors: int) -> np.ndarray:
    rows = list(vectors)
    return np.array(rows, dtype=np.float64) if rows else np.zeros((0, n_factors), dtype=np.float64)
