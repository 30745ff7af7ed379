"""Which event partitions a worker owns, and how their state comes and goes.

Partition N of every consumed topic holds the same users (all are keyed by user, with one
partition count, and Faust's assignor gives partition N of each to one worker), so "partition N"
is the unit of user state. A worker takes a partition when the group assigns it (or when its
first record arrives, whichever is first): it restores the partition's checkpoint and catches up
from Kafka to the group's committed offset before learning anything new from it. It checkpoints
its partitions periodically, and a partition once more when it is revoked, then lets its users
go. The item state is checkpointed beside them and restored when the worker starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from kafka.errors import KafkaError

from consumers.catch_up import CatchUp
from consumers.recovery import (
    ITEMS,
    checkpoint_live,
    checkpoint_set,
    legacy_checkpoint,
    partition_of_source,
    partition_part,
    split_legacy,
    unpack_items,
    unpack_partition,
)
from infra.checkpoint import CheckpointSet
from infra.store import REDIS_UNAVAILABLE

if TYPE_CHECKING:
    from consumers.worker import RefreshWorker

log = logging.getLogger("pushrec.worker")


class Ownership:
    """The partitions one worker owns; restore, catch-up, checkpoint and hand-over of their state."""

    def __init__(self, worker: RefreshWorker) -> None:
        self.worker = worker
        self.owned: set[int] = set()
        # Partitions of the event topics (from the Faust process; the setting until it tells).
        self.partition_count = worker.settings.kafka.partitions
        self._saving = asyncio.Lock()  # one checkpoint at a time (periodic, revoke, forget, stop)

    @property
    def checkpoints(self) -> CheckpointSet | None:
        return checkpoint_set(self.worker.settings, self.worker.store.client)

    async def start(self) -> None:
        """Before Faust starts: the item state (users come with their partitions)."""
        store = self.checkpoints
        if store is None:
            log.warning("checkpoints are off: partitions start empty at the committed offsets")
            await self._read_item_changes()
            return
        await self._split_legacy(store)
        blob = await store.part(ITEMS).load()
        recommender, exchange = self.worker.pipeline.recommender, self.worker.exchange
        if blob is None:
            log.info("no checkpoint of the item state in %s: the model starts empty", store.where)
        else:
            unwritten, exchange_state = unpack_items(blob, recommender)
            self.worker.lists.add_items(unwritten)
            exchange.restore(exchange_state)
            log.info("restored the item state from %s: %d items", store.where, len(recommender.items))
        await self._read_item_changes()

    async def _read_item_changes(self) -> None:
        """Apply the item changes the group published since the item state was saved."""
        exchange = self.worker.exchange
        if not exchange.on:
            return
        started, recommender = time.perf_counter(), self.worker.pipeline.recommender
        await exchange.read_to_end()
        log.info(
            "read the group's item changes to the end of %s in %.2fs: %d items held",
            exchange.topic,
            time.perf_counter() - started,
            len(recommender.items),
        )

    async def take(self, partitions: Collection[int]) -> None:
        """Own these partitions: restore their checkpoints, catch up from Kafka, write pending lists."""
        new = sorted(set(partitions) - self.owned)
        if not new:
            return
        started = time.perf_counter()
        self.owned.update(new)  # before the catch-up, whose records belong to them
        worker, store = self.worker, self.checkpoints
        recommender = worker.pipeline.recommender
        users_before = recommender.n_users
        restored: dict[str, int] = {}
        if store is not None:
            for partition in new:
                blob = await store.part(partition_part(partition)).load()
                if blob is not None:
                    offsets, unwritten, ranked = unpack_partition(blob, recommender, worker.seen, partition)
                    restored.update(offsets)
                    worker.lists.add(unwritten, ())
                    worker.lists.add_ranked(ranked)
        worker.offsets.update(restored)
        users = recommender.n_users - users_before
        worker.pipeline.follow(
            user for partition in new for user in recommender.users.in_partition(partition)
        )
        # What the last owner published is in the item state already: re-learned for the users
        # only (see consumers.item_exchange), whether from the catch-up or from Faust.
        await worker.exchange.read_to_end()
        published = worker.exchange.take_over(
            {
                f"{topic}:{partition}": worker.offsets.get(f"{topic}:{partition}", 0)
                for topic in worker.names.all_events
                for partition in new
            }
        )
        caught_up = await self._catch_up(new)
        log.info(
            "took partition(s) %s: %d users restored at offsets %s, %d records caught up from Kafka "
            "(item changes published through %s), in %.2fs",
            new,
            users,
            restored,
            caught_up,
            published,
            time.perf_counter() - started,
        )
        await worker.write_unwritten()

    async def give_up(self, partitions: Collection[int]) -> None:
        """Checkpoint these partitions (lists written first) and let their users go."""
        gone = sorted(set(partitions) & self.owned)
        if not gone:
            return
        worker = self.worker
        recommender = worker.pipeline.recommender
        await worker.write_unwritten()
        await self.save(gone)
        users = [user for partition in gone for user in recommender.users.in_partition(partition)]
        async with worker.lists.quiet():  # no write of their lists under way
            for user in users:
                worker.lists.forget(user)  # pending (Redis away): in the checkpoint, for the next owner
        worker.pipeline.drop_users(users)
        sources = [source for source in worker.offsets if partition_of_source(source) in gone]
        worker.seen.drop(sources)
        for source in sources:
            del worker.offsets[source]
            worker.exchange.published_ahead.pop(source, None)
        self.owned.difference_update(gone)
        log.info("gave up partition(s) %s: %d users checkpointed and let go", gone, len(users))

    async def save(self, partitions: Collection[int] | None = None) -> None:
        """Checkpoint the item state and ``partitions`` (default: every owned one)."""
        store = self.checkpoints
        if store is None:
            return
        worker = self.worker
        recommender, metrics = worker.pipeline.recommender, worker.metrics
        chosen = set(self.owned if partitions is None else partitions)
        try:
            async with self._saving:
                blobs = await checkpoint_live(
                    recommender,
                    worker.seen,
                    chosen,
                    worker.offsets,
                    lambda: worker.lists.unwritten,
                    lambda: worker.lists.pending_items,
                    cut=worker.exchange.cut,
                    ranked=lambda: worker.lists.ranked,
                )
                # Never a partition's checkpoint ahead of the item changes published from it.
                await worker.exchange.flush()
                await store.save_all(blobs)  # items and partitions together (same cut)
        except (OSError, *REDIS_UNAVAILABLE, KafkaError) as exc:
            metrics.checkpoints.labels("failed").inc()
            log.error("checkpoint to %s failed: %s", store.where, exc)
            return
        metrics.checkpoints.labels("ok").inc()
        metrics.checkpoint_time.set(time.time())
        log.debug("checkpoint saved to %s", store.where)

    def owns_user(self, user: str) -> bool:
        """Whether this worker answers for ``user``: it holds them, or owns the partition Kafka's
        default partitioner gives their id."""
        from stream.topics import partition_of

        recommender = self.worker.pipeline.recommender
        return recommender.users.holds(user) or partition_of(user, self.partition_count) in self.owned

    async def _catch_up(self, partitions: list[int]) -> int:
        """Re-learn what the group committed beyond the partitions' checkpoints."""
        worker = self.worker
        catch_up = CatchUp(
            worker.kafka,
            worker.settings.kafka.consumer_group,
            worker.consumed_topics,
            worker.offsets,
            worker.settings.worker.batch_max,
            partitions=partitions,
        )
        batches = catch_up.batches()
        try:  # one bounded batch in memory at a time, read in a thread, learned here
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                await worker.handle_records(batch, dead_letter=False)
        finally:
            batches.close()
        for cause, lost in (("retention", catch_up.retention_lost), ("truncated", catch_up.truncated)):
            if lost:
                worker.metrics.catch_up_lost.labels(cause).inc(sum(lost.values()))
        if catch_up.retention_lost:
            log.warning(
                "catch-up: retention deleted %d record(s) before the model learned them (%s); the "
                "model goes on from the first retained offsets. A checkpoint older than the topics' "
                "retention loses what lies between: checkpoint more often or retain longer",
                sum(catch_up.retention_lost.values()),
                _per_partition(catch_up.retention_lost),
            )
        if catch_up.truncated:
            log.warning(
                "catch-up: the group committed %d record(s) the broker no longer holds (%s): its "
                "log ends before the committed offsets; the model learned up to the log's end",
                sum(catch_up.truncated.values()),
                _per_partition(catch_up.truncated),
            )
        if catch_up.records:
            log.info("caught up %d records the group committed but the model did not hold", catch_up.records)
        return catch_up.records

    async def _split_legacy(self, store: CheckpointSet) -> None:
        """A whole-model checkpoint of an older pushrec becomes this group's checkpoint set."""
        legacy = legacy_checkpoint(self.worker.settings, self.worker.store.client)
        if legacy is None or await store.parts():
            return
        blob = await legacy.load()
        if blob is None:
            return
        parts = split_legacy(blob, self.worker.pipeline.recommender, self.partition_count)
        await store.save_all(parts)
        await legacy.delete()
        log.warning(
            "split the whole-model checkpoint %s into %d partition checkpoints in %s",
            legacy.where,
            len(parts) - 1,
            store.where,
        )


def _per_partition(counts: dict[str, int]) -> str:
    return ", ".join(f"{source}: {n}" for source, n in sorted(counts.items()))
