"""Worker checkpoints: model state, the offsets it reflects and the dedupe memory, as blobs.

A set of checkpoints is shared by every worker of a consumer group: one blob per event
partition (its users' state, offsets and dedupe memory: whoever owns the partition writes it)
and one of the item state (:class:`CheckpointSet`).

Format (versioned, no pickle): a numpy ``.npz`` archive whose ``meta`` entry is UTF-8 JSON
``{"format": "pushrec-checkpoint", "version": 1, ...}`` and whose other entries are plain numeric
arrays. It is read back with ``allow_pickle=False``, so a blob can never run code. Stored on disk
(written to a temporary file, fsync'd, renamed into place) or as one Redis key.

>>> blob = pack({"offsets": {"t:0": 7}}, {"x": np.arange(3.0)})
>>> meta, arrays = unpack(blob)
>>> meta["offsets"], arrays["x"].tolist()
({'t:0': 7}, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import orjson
import redis.asyncio as aioredis

from infra.store import reply_bytes

FORMAT = "pushrec-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is not ours, of another version, or damaged."""


# Entries per orjson call or per stacking step. Checkpoints are packed in a thread beside the
# model's event loop, and one C call holds the GIL from start to end: a million users' histories
# in one orjson call stopped the loop for 100+ ms.
_CHUNK = 4096
_LARGE = 4 << 20  # bytes
_SLICE = 1 << 20  # bytes of an array written at a time
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS  # as json.dumps did with int keys


class JsonPieces:
    """A large JSON object or list already encoded, as runs of its members (each run the
    comma-separated members between the brackets), that :func:`pack` writes one after the other
    and never joins: copying tens of MB into one buffer held the GIL, and so stopped the event
    loop, for tens of milliseconds (first-touched memory is slow on a virtual machine)."""

    __slots__ = ("opening", "members", "closing")

    def __init__(self, opening: bytes, members: list[bytes], closing: bytes) -> None:
        self.opening, self.members, self.closing = opening, members, closing

    @classmethod
    def object(cls, members: list[bytes]) -> JsonPieces:
        return cls(b"{", members, b"}")

    @classmethod
    def array(cls, members: list[bytes]) -> JsonPieces:
        return cls(b"[", members, b"]")


def pack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """``meta`` as JSON and ``arrays`` (a list of equal rows is stacked) in one blob, as
    ``np.savez`` writes it; large dicts and lists go a chunk at a time, so the GIL passes between
    chunks, and :class:`JsonPieces` a piece at a time."""
    pieces = list(_pieces({"format": FORMAT, "version": VERSION, **meta}))
    meta_bytes = sum(map(len, pieces))
    stacked = {name: np.asanyarray(_stacked(value)) for name, value in arrays.items()}
    size = meta_bytes + sum(value.nbytes for value in stacked.values())
    # A large blob goes through a temporary file: its writes release the GIL, while growing a
    # BytesIO by tens of MB held it (~150 ms for a 40 MB partition).
    with tempfile.TemporaryFile() if size > _LARGE else io.BytesIO() as buffer:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("meta.npy", "w", force_zip64=True) as out:
                header = {"descr": "|u1", "fortran_order": False, "shape": (meta_bytes,)}
                np.lib.format.write_array_header_1_0(out, header)
                for piece in pieces:
                    out.write(piece)
            for name, value in stacked.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                    _write_array(out, value)
        buffer.seek(0)
        return buffer.read()


def _write_array(out: IO[bytes], value: np.ndarray) -> None:
    """``np.lib.format.write_array`` without its copy of each 16 MB into new bytes (held the GIL
    ~50 ms at 1M users): the array's own memory, a slice at a time."""
    if value.dtype.hasobject:
        raise ValueError(f"a checkpoint array cannot hold objects ({value.dtype})")
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(value))
    memory = value.reshape(-1).view(np.uint8)
    for at in range(0, memory.size, _SLICE):
        out.write(memory[at : at + _SLICE])  # type: ignore[call-overload]  # any buffer


def _pieces(value: Any) -> Iterator[bytes]:
    """``orjson.dumps(value)``'s bytes in pieces, no call given more than a chunk of a dict or
    list."""
    if isinstance(value, JsonPieces):
        yield from _joined(value.opening, value.members, value.closing)
    elif isinstance(value, dict) and len(value) > _CHUNK:
        pairs = list(value.items())
        runs = (
            orjson.dumps(dict(pairs[at : at + _CHUNK]), option=_OPTIONS)[1:-1]
            for at in range(0, len(pairs), _CHUNK)
        )
        yield from _joined(b"{", runs, b"}")
    elif isinstance(value, dict):
        yield b"{"
        for n, (key, item) in enumerate(value.items()):
            yield (b"," if n else b"") + orjson.dumps({key: None}, option=_OPTIONS)[1:-5]  # "key":
            yield from _pieces(item)
        yield b"}"
    elif isinstance(value, list) and len(value) > _CHUNK:
        runs = (
            orjson.dumps(value[at : at + _CHUNK], option=_OPTIONS)[1:-1]
            for at in range(0, len(value), _CHUNK)
        )
        yield from _joined(b"[", runs, b"]")
    else:
        yield orjson.dumps(value, option=_OPTIONS)


def _joined(opening: bytes, members: Iterable[bytes], closing: bytes) -> Iterator[bytes]:
    """A JSON object or list from runs of its members, comma between runs."""
    yield opening
    for n, run in enumerate(members):
        if n:
            yield b","
        yield run
    yield closing


def _stacked(value: Any) -> Any:
    """A long list of equal arrays as one array, filled a chunk at a time."""
    if not isinstance(value, list) or len(value) <= _CHUNK:
        return value
    first = np.asarray(value[0])
    out = np.empty((len(value), *first.shape), dtype=first.dtype)
    for at in range(0, len(value), _CHUNK):
        out[at : at + _CHUNK] = value[at : at + _CHUNK]
    return out


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = orjson.loads(arrays.pop("meta").tobytes())
    except (ValueError, OSError, KeyError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CheckpointError(f"not a readable checkpoint: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint is {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this pushrec reads {FORMAT!r} version {VERSION}"
        )
    return meta, arrays


class CheckpointSet(Protocol):
    """Named checkpoints that every worker of a group reaches (a directory, Redis keys)."""

    where: str

    def part(self, name: str) -> CheckpointStore: ...
    async def parts(self) -> list[str]: ...
    async def save_all(self, blobs: dict[str, bytes]) -> None: ...


class DiskCheckpointSet:
    """``<directory>/<name>.npz`` per part."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.where = str(directory)

    def part(self, name: str) -> DiskCheckpoints:
        return DiskCheckpoints(self.directory / f"{name}.npz")

    async def parts(self) -> list[str]:
        return sorted(path.stem for path in self.directory.glob("*.npz"))

    async def save_all(self, blobs: dict[str, bytes]) -> None:
        """Replace these parts together: each is written and synced aside first, then all are
        renamed into place at once, so a crash while writing leaves the old set whole (the
        item state never ahead of, nor behind, the partitions' offsets)."""
        await asyncio.to_thread(self._write_all, blobs)

    def _write_all(self, blobs: dict[str, bytes]) -> None:
        paths = {name: self.part(name).path for name in blobs}
        staged = [(_stage(paths[name], blob), paths[name]) for name, blob in blobs.items()]
        for partial, path in staged:  # one thread, no wait: the only window is these renames
            os.replace(partial, path)


class RedisCheckpointSet:
    """``<key>:<name>`` per part."""

    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.where = f"redis keys {key}:*"

    def part(self, name: str) -> RedisCheckpoints:
        return RedisCheckpoints(self.client, f"{self.key}:{name}")

    async def parts(self) -> list[str]:
        prefix = f"{self.key}:"
        found = [k.decode() async for k in self.client.scan_iter(match=f"{prefix}*", count=1000)]
        return sorted(k.removeprefix(prefix) for k in found if not k.endswith(_STAGED))

    async def save_all(self, blobs: dict[str, bytes]) -> None:
        """Replace these parts together: each is written aside a piece at a time, then all are
        renamed into place in one MULTI/EXEC transaction (a crash before leaves the old set)."""
        staged = {}
        for name, blob in blobs.items():
            key = f"{self.key}:{name}"
            staged[await _stage_in_redis(self.client, key, blob)] = key
        await _replace_in_redis(self.client, staged)


_STAGED = ".partial"  # suffix of a blob's key while it is written
_STAGED_TTL_S = 3600  # a staged blob never renamed (its writer died) goes after this
_PIECE = 1 << 20  # bytes of a blob per Redis command


async def _stage_in_redis(client: aioredis.Redis, key: str, blob: bytes) -> str:
    """``blob`` written beside ``key`` a megabyte per command, to be renamed into place: the
    staging key. (The client copies a command into one buffer on the event loop: one SET or
    MULTI of a million users' checkpoint stopped the loop for ~400 ms.)"""
    staged, view = key + _STAGED, memoryview(blob)
    await client.set(staged, view[:_PIECE], ex=_STAGED_TTL_S)
    for at in range(_PIECE, len(view), _PIECE):
        await client.append(staged, view[at : at + _PIECE])
    return staged


async def _replace_in_redis(client: aioredis.Redis, staged: dict[str, str]) -> None:
    """Rename each staged key to its key (kept for good), all in one transaction."""
    async with client.pipeline(transaction=True) as pipe:
        for partial, key in staged.items():
            pipe.rename(partial, key)
            pipe.persist(key)
        await pipe.execute()


class CheckpointStore(Protocol):
    where: str

    async def save(self, blob: bytes) -> None: ...
    async def load(self) -> bytes | None: ...
    async def delete(self) -> None: ...


class DiskCheckpoints:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    async def save(self, blob: bytes) -> None:
        await asyncio.to_thread(self._write, blob)  # the event loop goes on while the disk works

    def _write(self, blob: bytes) -> None:
        os.replace(_stage(self.path, blob), self.path)

    async def load(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None

    async def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def _stage(path: Path, blob: bytes) -> Path:
    """``blob`` written and synced beside ``path``, to be renamed into place: the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        out.write(blob)
        out.flush()
        os.fsync(out.fileno())
    return partial


class RedisCheckpoints:
    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.where = f"redis key {key}"

    async def save(self, blob: bytes) -> None:
        await _replace_in_redis(self.client, {await _stage_in_redis(self.client, self.key, blob): self.key})

    async def load(self) -> bytes | None:
        return reply_bytes(await self.client.get(self.key))

    async def delete(self) -> None:
        await self.client.delete(self.key)
