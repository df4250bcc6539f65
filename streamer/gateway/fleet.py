"""What the gateway knows about the fleet: the workers' announcements and the lanes' backlog.

Workers announce themselves on the compacted `<prefix>.workers` topic (model, readiness, every
few seconds; streamer/health/announce.py). The gateway reads all of it from the beginning,
outside any group, and keeps each worker's latest status; one older than `ttl_s` (or three of
its own intervals, whichever is longer) belongs to a worker that is gone. From this come
`/v1/models`, 404 for a model no worker serves and 503 when none that serves it is ready.

A lane is saturated when its backlog, the sum over its partitions of (end offset - the workers'
committed offset), is above `max_backlog`: requests produced but not finished by the fleet, from
every producer, not only this gateway. It is read every `refresh_s` with `streamer top`'s reader
(a consumer with the workers' group id that never joins it), so the check costs no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.gateway.openai_format import ApiError
from streamer.top import BacklogReader

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    workers: int
    ready: int


class FleetView:
    def __init__(self, kafka: KafkaSettings, prefix: str, group: str, *, ttl_s: float,
                 refresh_s: float, max_backlog: int | None) -> None:
        self.kafka = kafka
        self.topic = protocol.workers_topic(prefix)
        self.ttl_ms = int(ttl_s * 1000)
        self.refresh_s = refresh_s
        self.max_backlog = max_backlog
        self.statuses: dict[str, protocol.WorkerStatus] = {}
        self.backlog: dict[str, int] = {}
        self.backlog_error: str | None = None
        self._backlog = BacklogReader(kafka, prefix, group)
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self.kafka.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, fetch_max_wait_ms=200)
        await self._consumer.start()
        self._tasks = [asyncio.create_task(self._read(), name="gateway-workers")]
        if self.max_backlog is not None:  # no limit: nothing to read it for
            self._tasks.append(asyncio.create_task(self._refresh_backlog(),
                                                   name="gateway-backlog"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        await self._backlog.close()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    # -- queries
    def live(self, now_ms: int | None = None) -> list[protocol.WorkerStatus]:
        now = protocol.now_ms() if now_ms is None else now_ms
        return [s for s in self.statuses.values()
                if now - s.ts <= max(self.ttl_ms, 3 * s.interval_ms)]

    def models(self) -> list[ModelInfo]:
        found: dict[str, list[protocol.WorkerStatus]] = {}
        for status in self.live():
            found.setdefault(status.model, []).append(status)
        return [ModelInfo(name, len(ws), sum(w.ready for w in ws))
                for name, ws in sorted(found.items())]

    def ready_workers(self) -> int:
        return sum(s.ready for s in self.live())

    def check_model(self, model: str) -> None:
        """404 for a model no live worker serves; 503 when none of its workers is ready."""
        models = {m.name: m for m in self.models()}
        if not models:
            raise ApiError(503, "no worker is ready: the fleet has announced no worker",
                           code="no_worker_ready")
        info = models.get(model)
        if info is None:
            raise ApiError(404, f"The model `{model}` does not exist: the fleet serves "
                           f"{', '.join(sorted(models))}", code="model_not_found", param="model")
        if info.ready == 0:
            raise ApiError(503, f"no worker serving `{model}` is ready", code="no_worker_ready")

    def check_lane(self, lane: str) -> None:
        """429 when the lane's backlog is past max_backlog (unknown backlog: let it through)."""
        backlog = self.backlog.get(lane)
        if self.max_backlog is not None and backlog is not None and backlog > self.max_backlog:
            raise ApiError(429, f"the {lane} lane is saturated: {backlog} requests waiting "
                           f"(limit {self.max_backlog}); retry later or use another lane",
                           code="lane_saturated")

    # -- background readers
    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not consumer.assignment():
            partitions = consumer.partitions_for_topic(self.topic)
            if partitions:
                tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                break
            log.info("gateway_waiting_for_topic", topic=self.topic)
            with contextlib.suppress(Exception):
                await consumer.topics()
            await asyncio.sleep(1.0)
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except (KafkaError, ConnectionError, TimeoutError) as exc:  # the broker is away
                log.debug("gateway_workers_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    self._on_record(record.key, record.value)

    def _on_record(self, key: bytes | None, value: bytes | None) -> None:
        name = (key or b"").decode("utf-8", "replace")
        if value is None:
            self.statuses.pop(name, None)  # a clean stop's tombstone
            return
        try:
            status = protocol.decode_worker_status(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.statuses[status.worker] = status

    async def _refresh_backlog(self) -> None:
        while True:
            backlog, error = await self._backlog.read()
            if backlog is not None:
                self.backlog = backlog
            if error and error != self.backlog_error:
                log.warning("gateway_backlog_unavailable", error=error)
            self.backlog_error = error
            await asyncio.sleep(self.refresh_s)
