"""The model process: its entry point, the messages it exchanges with the Faust process
(``consumers.ingest``) over a pipe, and the loop that applies them to a ``RefreshWorker``.

Messages are read one at a time, only when the previous one is done: a slow model makes the
Faust process wait on a full pipe instead of buffering records here. They are read on the event
loop's thread (``consumers.pipes.receive``). An unexpected exception exits the process (code 70)
without a checkpoint; the Faust process sees it end and exits too."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

from consumers.pipes import die_with_parent, receive
from consumers.protocol import ASSIGN, DONE, HIGHWATER, LOOP_LAG, READY, RECORDS, REVOKE, STOP
from consumers.worker import RefreshWorker, exit_on_bug
from infra.collector import freeze_what_lives
from infra.kafka import KafkaAccess
from infra.loop_watch import LoopWatch
from infra.settings import Settings
from stream.records import Record

log = logging.getLogger("pushrec.worker")


async def serve(worker: RefreshWorker, inbox: Connection, outbox: Connection) -> None:
    """Restore and catch up, answer READY, then apply what the Faust process sends until STOP."""
    worker.outbox = outbox
    await worker.ownership.start()
    worker.inbox = inbox
    freeze_what_lives("model")
    outbox.send((READY, None))
    timers = [
        asyncio.create_task(_every(1.0, worker.refresh_lists)),
        asyncio.create_task(_every(1.0, worker.apply_forget_requests)),
        asyncio.create_task(_every(worker.settings.checkpoint.every_s, worker.ownership.save)),
        asyncio.create_task(
            LoopWatch(
                "model", worker.metrics.loop_lag.labels("model").observe, worker.settings.worker.loop_block_s
            ).run()
        ),
    ]
    if worker.exchange.on:  # the group's item state: publish this worker's changes, apply others'
        timers.append(asyncio.create_task(_every(worker.exchange.sync_s, worker.exchange.publish)))
        timers.append(asyncio.create_task(_or_exit(worker.exchange.follow(), "reading item changes")))
    try:
        while True:
            try:
                kind, payload = await receive(inbox)
            except EOFError:
                log.error("the Faust process is gone: stopping without a checkpoint")
                return
            if kind == RECORDS:
                read_at, batch = payload
                await _or_exit(
                    worker.handle_records([Record(*fields) for fields in batch], read_at=read_at),
                    f"a batch of {len(batch)} records",
                )
            elif kind == ASSIGN:
                partitions, count = payload
                worker.ownership.partition_count = count
                log.info("assigned %d event partitions: %s of %d", len(partitions), partitions, count)
                await _or_exit(worker.ownership.take(partitions), f"taking partitions {partitions}")
                freeze_what_lives("model", generation=1)  # what the partitions restored
                worker.metrics.assigned_partitions.set(len(partitions))
                outbox.send((DONE, None))
            elif kind == REVOKE:
                await _or_exit(worker.ownership.give_up(payload), f"giving up partitions {payload}")
                worker.metrics.assigned_partitions.set(len(worker.ownership.owned))
                outbox.send((DONE, None))
            elif kind == HIGHWATER:
                worker.export_lag(payload)
            elif kind == LOOP_LAG:
                faust_lag = worker.metrics.loop_lag.labels("faust")
                for lag in payload:
                    faust_lag.observe(lag)
            elif kind == STOP:
                await worker.write_unwritten()
                await worker.ownership.save()
                outbox.send((DONE, None))
                return
    finally:
        for timer in timers:
            timer.cancel()
        await worker.close()


async def _every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await _or_exit(job(), "a periodic job")


async def _or_exit(work: Awaitable[None], what: str) -> None:
    """Run ``work``; on an unexpected exception exit the process without a checkpoint."""
    try:
        await work
    except Exception as exc:
        exit_on_bug(what, exc)


def model_process(
    settings: Settings,
    kafka: KafkaAccess,
    redis_url: str,
    metrics_port: int | None,
    inbox: Connection,
    outbox: Connection,
) -> None:
    """Entry point of the model process (spawned by ``consumers.ingest``)."""
    die_with_parent()  # the Faust process decides when it stops (STOP)
    from threadpoolctl import threadpool_limits

    from infra.logs import setup_logging

    setup_logging(settings)
    # One BLAS thread: the model shares the machine with the Faust process and the broker, and
    # OpenBLAS's spinning threads then slow small products down (a 9k x 256 product took 12 ms
    # instead of 0.6 ms on a busy 2-core machine). `evaluate` keeps numpy's default.
    threadpool_limits(limits=1, user_api="blas")
    worker = RefreshWorker(settings, kafka, redis_url)
    worker.lists.store.start()
    processes = {"model": os.getpid(), "faust": os.getppid(), "lists": worker.lists.store.pid}
    worker.metrics.watch_cpu(processes)  # (this one spawned by Faust's, the lists' by this one)
    if metrics_port is not None:
        worker.metrics.serve(metrics_port)
    asyncio.run(serve(worker, inbox, outbox))
