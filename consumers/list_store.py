"""The worker's third process: it stores the lists the model process ranks, and the catalogue's
items, in Redis.

Why a process and not a thread of the model's: the model reads its pipe on its event loop's own
thread (``consumers.pipes.receive``), since a hand-over through a reading thread cost it
2.2-2.9 ms a micro-batch on a busy machine. But a Redis client needs the interpreter for every
step of a round trip, and on a thread beside the model's, which learns and ranks without a
pause, each step then waited for the model to let go of the GIL: the slowest lists waited
0.15-3.4 s for Redis instead of 10-30 ms (docs/benchmarks.md). In a process of its own the
client runs whenever a core is free, whatever the model is doing.

The model process sends ``(items, lists)`` pickled, one write at a time (``ListWriter`` sends the
next once this one is answered), and the store answers when Redis has them: ``(WRITTEN, unix
time)``; ``(UNAVAILABLE, the exception)`` when Redis is away or refuses (the model keeps the users
pending and backs off); ``(BUG, traceback)`` for anything else (the model exits). The process
dies with the model process, and ends on ``None`` once the writes before it are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from consumers.pipes import die_with_parent, receive, widen
from infra.collector import freeze_what_lives
from infra.settings import Settings
from infra.store import REDIS_UNAVAILABLE, Keys, RedisTopNStore, connect
from online_models.recommender import TopN
from stream.events import Item

log = logging.getLogger("pushrec.worker")
WRITTEN, UNAVAILABLE, BUG = "written", "unavailable", "bug"


class ListStoreGone(RuntimeError):
    """The store process ended or failed: the model process cannot write lists any more."""


class ListStore:
    """The model process's end of the store process (started at the first write, or by
    :meth:`start`)."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.process: Any = None
        self._requests: Connection | None = None
        self._answers: Connection | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else int(self.process.pid)

    def start(self) -> None:
        if self.process is not None:
            return
        context = multiprocessing.get_context("spawn")
        theirs, self._requests = context.Pipe(duplex=False)
        self._answers, answers = context.Pipe(duplex=False)
        widen(self._requests)  # a catalogue chunk goes in one piece
        self.process = context.Process(
            target=store_process, args=(self.settings, self.redis_url, theirs, answers), name="pushrec-lists"
        )
        self.process.start()
        theirs.close()
        answers.close()

    def send(self, items: Sequence[Item], lists: Sequence[TopN]) -> None:
        """Hand the store ``items``, then ``lists``, to write (one write at a time: read its
        answer before the next). Raises ListStoreGone if the store process has ended."""
        self.start()
        assert self._requests is not None
        try:
            self._requests.send_bytes(
                pickle.dumps((list(items), list(lists)), protocol=pickle.HIGHEST_PROTOCOL)
            )
        except OSError as exc:
            raise self._gone() from exc

    def answered(self) -> bool:
        """Whether the write sent last has its answer waiting (or the store process ended)."""
        return self._answers is not None and self._answers.poll(0)

    def answer(self) -> float:
        """The answer to the write sent last (waiting for it): when Redis had it all (Unix time).
        Raises one of ``REDIS_UNAVAILABLE`` when Redis was away or refused, ListStoreGone when
        the store process failed or ended."""
        assert self._answers is not None
        try:
            kind, payload = self._answers.recv()
        except (OSError, EOFError) as exc:
            raise self._gone() from exc
        if kind == WRITTEN:
            return float(payload)
        if kind == UNAVAILABLE:
            raise payload
        raise ListStoreGone(f"the list store process failed:\n{payload}")

    def fileno(self) -> int:
        """What an event loop watches for the answer (``loop.add_reader``)."""
        assert self._answers is not None
        return self._answers.fileno()

    def _gone(self) -> ListStoreGone:
        self.process.join(1.0)
        return ListStoreGone(f"the list store process ended (exit code {self.process.exitcode})")

    def close(self) -> None:
        """End the store process (after the last write)."""
        if self.process is None:
            return
        assert self._requests is not None and self._answers is not None
        with contextlib.suppress(OSError):  # (ended already)
            self._requests.send_bytes(pickle.dumps(None))
        self.process.join(10.0)
        if self.process.exitcode is None:
            log.warning("the list store process did not end within 10 s: killed")
            self.process.kill()
            self.process.join(5.0)
        self._requests.close()
        self._answers.close()
        self.process = None


def store_process(settings: Settings, redis_url: str, requests: Connection, answers: Connection) -> None:
    """Entry point of the store process (spawned by :class:`ListStore`)."""
    die_with_parent()  # the model process decides when it ends (None)
    from infra.logs import setup_logging

    setup_logging(settings)
    asyncio.run(_serve(settings, redis_url, requests, answers))


async def _serve(settings: Settings, redis_url: str, requests: Connection, answers: Connection) -> None:
    redis = settings.redis
    store = RedisTopNStore(connect(redis_url, redis.retries), Keys(redis.key_prefix), redis.stream_maxlen)
    freeze_what_lives("list store")
    try:
        while True:
            try:
                request = await receive(requests)
            except EOFError:  # the model process is gone
                return
            if request is None:
                return
            items, lists = request
            try:
                if items:
                    await store.write_items(items)
                if lists:
                    await store.write_lists(lists, time.time())
                answers.send((WRITTEN, time.time()))
            except REDIS_UNAVAILABLE as exc:
                answers.send((UNAVAILABLE, _picklable(exc)))
            except Exception:
                answers.send((BUG, traceback.format_exc()))
    finally:
        await store.client.aclose()


def _picklable(exc: BaseException) -> BaseException:
    """``exc``, or the first of ``REDIS_UNAVAILABLE`` it is, with its message, where it does
    not pickle (redis-py's own do)."""
    try:
        pickle.dumps(exc)
    except Exception:
        return next(kind for kind in REDIS_UNAVAILABLE if isinstance(exc, kind))(str(exc))
    return exc
