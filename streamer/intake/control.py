"""Control: every worker reads every cancel, outside the consumer group.

On start it replays the last `window_s` seconds of the control topic, so a cancel produced while the
worker was down (or before its request arrived) still applies. The listener is supervised: a bad
record is skipped and logged, a failed fetch is retried with backoff, and `alive` turns False (so
/healthz fails) if it ever stops for good.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.intake.fetch import TRANSIENT, Fetcher

log = structlog.get_logger(__name__)


class CancelRegistry:
    """Cancelled ids remembered for `window_s` seconds after the cancel (pure; `now` injected).

    Cancels arrive out of time order (a replay reads partition by partition), so expiry is kept
    in a heap ordered by time, not by arrival."""

    def __init__(self, window_s: float, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._ids: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def add(self, request_id: str, at: float) -> None:
        if self._ids.get(request_id, float("-inf")) >= at:
            return
        self._ids[request_id] = at
        heapq.heappush(self._heap, (at, request_id))
        while len(self._ids) > self.max_entries:
            self._pop_oldest()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def prune(self, now: float) -> None:
        while self._heap and now - self._heap[0][0] > self.window_s:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        at, request_id = heapq.heappop(self._heap)
        if self._ids.get(request_id) == at:  # else superseded by a later cancel of the same id
            del self._ids[request_id]

    def __len__(self) -> int:
        return len(self._ids)


class ControlListener:
    def __init__(
        self,
        kafka: KafkaSettings,
        prefix: str,
        window_s: float,
        on_cancel: Callable[[str], None],
    ) -> None:
        self.topic = protocol.control_topic(prefix)
        self.cancels = CancelRegistry(window_s)
        self._on_cancel = on_cancel
        self._kafka = kafka
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._fetcher: Fetcher | None = None
        self.failure: str | None = None
        self.skipped = 0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._consumer = AIOKafkaConsumer(
            **self._kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        tps = await self._partitions()
        self._consumer.assign(tps)
        since_ms = int((time.time() - self.cancels.window_s) * 1000)
        try:
            found = await self._consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            for tp in tps:
                if found.get(tp) is not None:
                    self._consumer.seek(tp, found[tp].offset)
                else:
                    await self._consumer.seek_to_end(tp)
        except Exception as exc:  # a broker without ListOffsets by time: replay all retained
            log.warning("control_replay_by_time_unavailable", error=repr(exc))
            await self._consumer.seek_to_beginning(*tps)
        self._fetcher = Fetcher(self._consumer, max_records=500)
        for tp in tps:
            self._fetcher.remember(tp, await self._consumer.position(tp))
        self._task = asyncio.create_task(self._supervise(), name="control")

    async def _partitions(self) -> list[TopicPartition]:
        assert self._consumer is not None
        for _ in range(20):
            if partitions := self._consumer.partitions_for_topic(self.topic):
                return [TopicPartition(self.topic, p) for p in sorted(partitions)]
            await self._consumer.topics()  # refreshes metadata (a topic just created)
            await asyncio.sleep(0.25)
        return []

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _supervise(self) -> None:
        fetcher = self._fetcher
        assert fetcher is not None
        backoff = 0.1
        while True:
            try:
                records, poisoned = await fetcher.fetch(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                log.warning("control_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:  # never silently: /healthz reports a dead listener
                self.failure = repr(exc)[:300]
                log.exception("control_listener_failed")
                raise
            backoff = 0.1
            for bad in poisoned:
                self.skipped += 1
                log.warning("control_record_skipped", partition=bad.partition,
                            offset=bad.offset, error=bad.error)
            self.cancels.prune(time.time())
            for record in records:
                self.handle(record.value, record.timestamp / 1000)

    def handle(self, value: bytes | None, at: float) -> None:
        """One control record; anything that does not decode is skipped, never raised."""
        try:
            message = protocol.decode_control(value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as exc:
            self.skipped += 1
            log.warning("control_message_ignored", error=str(exc)[:200])
            return
        if time.time() - at > self.cancels.window_s:
            return
        self.cancels.add(message.request_id, at)
        try:
            self._on_cancel(message.request_id)
        except Exception:
            log.exception("cancel_failed", request_id=message.request_id)
