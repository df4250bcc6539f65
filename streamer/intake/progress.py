"""Reading progress: where earlier attempts of this worker's requests stopped.

Attempts write their progress to the partition of the progress topic that matches their request
record's partition (`egress/progress.py`). So a worker reads only the progress partitions of the
request partitions it owns, from the beginning (a compacted topic: one entry per in-flight
request) and keeps only entries whose request record it owns; a tombstone removes an entry. Memory
is bounded by the requests in flight on the partitions it owns.

After each assignment a partition is *ready* once read up to the end it had then; `lookup` waits
(bounded) for that, so a request handed over is not started afresh because its progress was still
unread. Anything undecodable is skipped and counted, never raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.intake.fetch import TRANSIENT, Fetcher
from streamer.protocol import Progress

log = structlog.get_logger(__name__)

RecordPartition = tuple[str, int]  # (request topic, partition)


class ProgressStore:
    def __init__(self, kafka: KafkaSettings, prefix: str, partitions: int) -> None:
        self.topic = protocol.progress_topic(prefix)
        self.partitions = partitions
        self._kafka = kafka
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._entries: dict[str, Progress] = {}
        self._owned: set[RecordPartition] = set()
        self._wanted: set[RecordPartition] | None = None  # an assignment not yet applied
        self._changed = asyncio.Event()
        self._ends: dict[int, int] = {}  # progress partition -> end offset to reach for ready
        self._ready = asyncio.Event()
        self.skipped = 0
        self.failure: str | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._consumer = AIOKafkaConsumer(
            **self._kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="progress")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    def own(self, partitions: Iterable[RecordPartition]) -> None:
        """The request partitions this worker owns now (after each rebalance)."""
        self._wanted = set(partitions)
        self._ready.clear()
        self._changed.set()

    async def lookup(self, request_id: str, topic: str, partition: int, offset: int,
                     timeout: float) -> Progress | None:
        """The progress of exactly this request record, once its partition is read."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            log.warning("progress_not_ready", request_id=request_id, timeout_s=timeout)
        entry = self._entries.get(request_id)
        if entry is None or (entry.topic, entry.partition, entry.offset) != (
            topic, partition, offset
        ):
            return None
        return entry

    # ------------------------------------------------------------------ the reader

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        fetcher = Fetcher(consumer, max_records=500)
        backoff = 0.1
        while True:
            try:
                if self._wanted is not None:
                    fetcher = Fetcher(consumer, max_records=500)
                    await self._apply(consumer, fetcher, self._wanted)
                    continue  # another assignment may have come while this one was applied
                if not consumer.assignment():
                    self._ready.set()
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                records, poisoned = await fetcher.fetch(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                log.warning("progress_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:  # never silently: /healthz reports a dead reader
                self.failure = repr(exc)[:300]
                log.exception("progress_reader_failed")
                raise
            backoff = 0.1
            self.skipped += len(poisoned)
            for record in records:
                self.handle(record.key, record.value)
            await self._check_ready(consumer)

    async def _apply(self, consumer: AIOKafkaConsumer, fetcher: Fetcher,
                     wanted: set[RecordPartition]) -> None:
        """Read the progress partitions of `wanted` from the beginning; drop other entries."""
        self._wanted = None
        self._owned = wanted
        self._entries = {k: e for k, e in self._entries.items()
                         if (e.topic, e.partition) in wanted}
        tps = sorted({TopicPartition(self.topic, p % self.partitions) for _, p in wanted})
        consumer.assign(tps)
        if not tps:
            self._ends = {}
            return
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        self._ends = {tp.partition: ends[tp] for tp in tps}
        for tp in tps:
            fetcher.remember(tp, await consumer.position(tp))
        await self._check_ready(consumer)

    async def _check_ready(self, consumer: AIOKafkaConsumer) -> None:
        if self._ready.is_set() or self._wanted is not None:
            return
        for partition, end in self._ends.items():
            if await consumer.position(TopicPartition(self.topic, partition)) < end:
                return
        self._ready.set()

    def handle(self, key: bytes | None, value: bytes | None) -> None:
        """One progress record: keep it if its request record is owned; a tombstone removes."""
        if value is None:
            if key is not None:
                self._entries.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            entry = protocol.decode_progress(value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as exc:
            self.skipped += 1
            log.warning("progress_record_ignored", error=str(exc)[:200])
            return
        if (entry.topic, entry.partition) in self._owned:
            self._entries[entry.request_id] = entry
