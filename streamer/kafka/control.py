"""Control: every worker reads every cancel, outside the consumer group.

On start it replays the last `window_s` seconds of the control topic, so a cancel produced while the
worker was down (or before its request arrived) still applies.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings

log = structlog.get_logger(__name__)


class CancelRegistry:
    """Cancelled ids remembered for a bounded time (pure; `now` is injected)."""

    def __init__(self, window_s: float, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, at: float) -> None:
        self._ids[request_id] = at
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def prune(self, now: float) -> None:
        while self._ids:
            request_id, at = next(iter(self._ids.items()))
            if now - at <= self.window_s:
                break
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
        self._consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, fetch_max_wait_ms=50)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
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
        self._task = asyncio.create_task(self._run(), name="control")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            self.cancels.prune(time.time())
            for records in batches.values():
                for record in records:
                    self._handle(record.value, record.timestamp / 1000)

    def _handle(self, value: bytes | None, at: float) -> None:
        try:
            message = protocol.decode_control(value or b"")
        except (msgspec.DecodeError, RecursionError) as exc:
            log.warning("control_message_ignored", error=str(exc)[:200])
            return
        if time.time() - at > self.cancels.window_s:
            return
        self.cancels.add(message.request_id, at)
        self._on_cancel(message.request_id)
