"""Worker checkpoints: model state, the offsets it reflects and the dedupe memory, as blobs.

A set of checkpoints is shared by every worker of a consumer group: one blob per event
partition (its users' state, offsets and dedupe memory: whoever owns the partition writes it)
and one of the item state (:class:`CheckpointSet`).

Format (versioned, no pickle): a numpy ``.npz`` archive whose ``meta`` entry is UTF-8 JSON
``{"format": "pushrec-checkpoint", "version": 1, ...}`` and whose other entries are plain numeric
arrays. It is read back with ``allow_pickle=False``, so a blob can never run code. Stored on disk
(written aside, fsync'd, renamed into place; a set committed by a manifest first) or as one Redis
key.

>>> blob = pack({"offsets": {"t:0": 7}}, {"x": np.arange(3.0)})
>>> meta, arrays = unpack(blob)
>>> meta["offsets"], arrays["x"].tolist()
({'t:0': 7}, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import orjson
import redis.asyncio as aioredis

from infra.faults import crash_point
from infra.store import reply_bytes

log = logging.getLogger("pushrec.worker")

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
    """``<directory>/<name>.npz`` per part.

    A set is replaced by rolling forward, so a crash at any moment (even between two renames)
    leaves one whole set, old or new, never the item state ahead of the partitions' offsets:

    1. each part is written and synced aside, under a name of its own writer's;
    2. a manifest naming them is renamed into place: from here the new set is committed;
    3. the parts are renamed into place and the manifest removed.

    Whoever reads the set first finishes any manifest it finds (:meth:`roll_forward`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.where = str(directory)

    def part(self, name: str) -> DiskCheckpoints:
        self.roll_forward()
        return DiskCheckpoints(self.directory / f"{name}.npz")

    async def parts(self) -> list[str]:
        self.roll_forward()
        return sorted(path.stem for path in self.directory.glob("*.npz"))

    async def save_all(self, blobs: dict[str, bytes]) -> None:
        """Replace these parts together (see the class)."""
        await asyncio.to_thread(self._write_all, blobs)

    def _write_all(self, blobs: dict[str, bytes]) -> None:
        renames: list[tuple[str, str]] = []
        try:
            for name, blob in blobs.items():
                renames.append((_stage(self.directory / f"{name}.npz", blob).name, f"{name}.npz"))
        except BaseException:  # not committed: what was written aside goes
            for partial, _ in renames:
                (self.directory / partial).unlink(missing_ok=True)
            raise
        manifest = self.directory / f"{_writer_token()}{_COMMIT}"
        os.replace(_stage(manifest, orjson.dumps(renames)), manifest)  # the commit
        _sync_directory(self.directory)
        self._finish(manifest, renames)

    def _finish(self, manifest: Path, renames: Sequence[Sequence[str]]) -> None:
        for partial, name in renames:
            with contextlib.suppress(FileNotFoundError):  # renamed by a reader rolling forward
                os.replace(self.directory / partial, self.directory / name)
            crash_point("checkpoint.renamed")
        _sync_directory(self.directory)
        manifest.unlink(missing_ok=True)

    def roll_forward(self) -> None:
        """Finish the sets committed and not yet in place (their writer crashed, or is renaming),
        oldest first; remove what writers wrote aside and never committed, an hour on."""
        if not self.directory.is_dir():
            return
        manifests = []
        for manifest in self.directory.glob(f"*{_COMMIT}"):
            with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                manifests.append((manifest.stat().st_mtime, manifest, orjson.loads(manifest.read_bytes())))
        for _, manifest, renames in sorted(manifests, key=lambda found: found[0]):
            self._finish(manifest, renames)
            log.warning(
                "checkpoint set in %s: finished the replacement of %s committed by %s (its writer "
                "stopped before renaming every part)",
                self.directory,
                ", ".join(name for _, name in renames),
                manifest.name,
            )
        stale = time.time() - _STAGED_TTL_S
        for partial in self.directory.glob(f"*{_PARTIAL}"):
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_mtime < stale:
                    partial.unlink()


_PARTIAL = ".partial"  # suffix of a blob while it is written (a file, or a Redis key)
_COMMIT = ".commit"  # suffix of a disk set's manifest
_STAGED_TTL_S = 3600  # a blob written aside and never renamed (its writer died) goes after this


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a power cut keeps them, in order)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        return sorted(k.removeprefix(prefix) for k in found if _PARTIAL not in k)

    async def save_all(self, blobs: dict[str, bytes]) -> None:
        """Replace these parts together: each is written aside a piece at a time, then all are
        renamed into place in one MULTI/EXEC transaction (a crash before leaves the old set)."""
        keys = {f"{self.key}:{name}": blob for name, blob in blobs.items()}
        staged = {_staging_key(key): key for key in keys}
        try:
            for partial, key in staged.items():
                await _stage_in_redis(self.client, partial, keys[key])
        except BaseException:  # not renamed: what was written aside goes (else its TTL does)
            with contextlib.suppress(Exception):
                await self.client.delete(*staged)
            raise
        await _replace_in_redis(self.client, staged)


_PIECE = 1 << 20  # bytes of a blob per Redis command


def _staging_key(key: str) -> str:
    """Where a blob is written before it is renamed to ``key`` (this writer's alone: two workers
    saving the item state at once never append into one key)."""
    return f"{key}{_PARTIAL}:{_writer_token()}"


async def _stage_in_redis(client: aioredis.Redis, staged: str, blob: bytes) -> None:
    """``blob`` written to ``staged`` a megabyte per command, to be renamed into place. (The
    client copies a command into one buffer on the event loop: one SET or MULTI of a million
    users' checkpoint stopped the loop for ~400 ms.)"""
    view = memoryview(blob)
    await client.set(staged, view[:_PIECE], ex=_STAGED_TTL_S)
    for at in range(_PIECE, len(view), _PIECE):
        await client.append(staged, view[at : at + _PIECE])


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
    """``blob`` written and synced beside ``path``, to be renamed into place: the file (named for
    this writer alone: two workers sharing the directory never write into one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{_writer_token()}{_PARTIAL}")
    try:
        with open(partial, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def _writer_token() -> str:
    """A name no other writer, nor this one's next write, uses."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


class RedisCheckpoints:
    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.where = f"redis key {key}"

    async def save(self, blob: bytes) -> None:
        staged = _staging_key(self.key)
        await _stage_in_redis(self.client, staged, blob)
        await _replace_in_redis(self.client, {staged: self.key})

    async def load(self) -> bytes | None:
        return reply_bytes(await self.client.get(self.key))

    async def delete(self) -> None:
        await self.client.delete(self.key)
