"""The plumbing between a worker's processes: pipes a megabyte wide, children that die with
their parent, and reading a pipe without a thread."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

PIPE_BYTES = 1 << 20  # ~6 micro-batches of 500 taobao records


def widen(pipe: Connection) -> None:
    """Let ``pipe`` hold ~a megabyte instead of Linux's default 64 KB: the sending thread then
    hands over a whole batch and goes on to gather the next one while the reader works, instead
    of waiting until it has read most of this one (measured on the pipe to the model process: it
    waited 28-34 % of a backlog's time for its next batch, then 12-15 %). Still bounded: a slow
    reader fills it and blocks the sender. Elsewhere, or above the system's limit
    (``/proc/sys/fs/pipe-max-size``), the default stays."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def die_with_parent() -> None:
    """A child process's start: its parent decides when it stops (a message on the pipe), so
    SIGINT and SIGTERM (a Ctrl-C reaches the whole process group) are ignored; and on Linux it
    gets SIGKILL when its parent dies (kill -9 leaves no orphan writing lists or checkpoints
    beside the restarted worker). Elsewhere: EOF on the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def receive(pipe: Connection) -> Any:
    """The next message on ``pipe`` (pickled); EOFError once the other end is closed.

    Read on the event loop's thread, waited for on the loop's own selector: no thread is woken to
    hand a message over, and none needs the GIL for it (a hand-over through a reading thread cost
    the model process 2.2-2.9 ms a micro-batch on a busy machine, docs/benchmarks.md). The loop
    gets a turn first, also when a message is waiting already: a reader that is behind still
    lets its timers run between messages."""
    await asyncio.sleep(0)
    if not pipe.poll(0):
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(pipe.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(pipe.fileno())
    return pickle.loads(pipe.recv_bytes())
