"""The commit loop: commit, per assigned partition, what the offset tracker says is finished.

Commit path, per partition:
 1. A consumed record is tracked as unfinished (intake).
 2. Its outcome (terminal event, DLQ copy) is produced and acknowledged by the broker (egress).
 3. Only then is its offset finished in the OffsetTracker.
 4. This loop commits the lowest unfinished offset (or last finished + 1) per partition.
A crash therefore redelivers every request that had no acknowledged outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from streamer.aio import cancel_and_wait
from streamer.commits.offsets import OffsetTracker
from streamer.observability.metrics import WorkerMetrics

log = structlog.get_logger(__name__)


class Committer:
    def __init__(
        self,
        consumer: Callable[[], AIOKafkaConsumer | None],
        offsets: OffsetTracker,
        metrics: WorkerMetrics,
        interval_s: float = 0.5,
    ) -> None:
        self._consumer = consumer
        self.offsets = offsets
        self.metrics = metrics
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self._lag_labels: set[TopicPartition] = set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="commit-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed commit is retried next round
                self.failures += 1
                if self.failures == 1 or self.failures % 60 == 0:
                    log.warning("commit_failed", error=repr(exc)[:200], failures=self.failures)
            else:
                self.failures = 0

    async def commit(self) -> None:
        consumer = self._consumer()
        if consumer is None:
            return
        positions = self.offsets.committable()
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        positions = {tp: off for tp, off in positions.items() if tp in assigned}
        if not positions:
            return
        await consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(off, "") for (t, p), off in positions.items()}
        )
        self.offsets.mark_committed(positions)

    def refresh_lag(self) -> None:
        """Lag per partition: records past the first unfinished one (what a commit would leave)."""
        consumer = self._consumer()
        assigned = set(consumer.assignment()) if consumer is not None else set()
        for tp in self._lag_labels - assigned:  # moved away: its lag is its new owner's to report
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self._lag_labels &= assigned
        if consumer is None:
            return
        for tp in assigned:
            end = consumer.highwater(tp)
            position = self.offsets.position(tp.topic, tp.partition)
            if end is None or position is None:
                continue
            self._lag_labels.add(tp)
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - position)
            )
