"""The gateway's one Kafka reader for every open request, and cancels for those it abandons.

A `StreamerClient` already is that reader: one consumer outside any group, assigned only the
`<prefix>.tokens` / `<prefix>.events` partitions the open requests' ids hash to, its assignment
growing as new ids need new partitions (docs/protocol.md, "Reading your own outputs"). Every
HTTP request gets a handle on it; none opens a consumer of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from aiokafka.errors import KafkaError

from streamer.client import RequestHandle, StreamerClient
from streamer.config import KafkaSettings
from streamer.gateway.openai_format import ApiError, invalid

log = structlog.get_logger(__name__)

SUBMIT_TIMEOUT_S = 10.0
"""How long producing a request may take before the caller gets 503 (the broker is away)."""


class Streams:
    def __init__(self, kafka: KafkaSettings, prefix: str) -> None:
        self.client = StreamerClient(kafka, prefix)
        self._cancels: set[asyncio.Task[None]] = set()
        self.cancelled = 0

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        if self._cancels:  # cancels already promised to a client that left: let them go out
            await asyncio.wait(list(self._cancels), timeout=5)
        await self.client.stop()

    async def submit(self, request_id: str, priority: str, fields: dict[str, Any]) -> RequestHandle:
        """Produce the request (its output partitions are read first) and return its handle."""
        try:
            return await asyncio.wait_for(
                self.client.submit(request_id=request_id, priority=priority, **fields),
                SUBMIT_TIMEOUT_S)
        except msgspec.ValidationError as exc:  # the field check the worker would do, earlier
            raise invalid(str(exc), code="invalid_field") from None
        except (KafkaError, ConnectionError, TimeoutError) as exc:
            # It may still reach the lane later: make sure it does not run for nobody.
            self.abandon(request_id)
            log.warning("gateway_submit_failed", request_id=request_id, error=repr(exc)[:200])
            raise ApiError(503, "the gateway cannot reach Kafka right now; retry later",
                           code="kafka_unavailable") from None

    def abandon(self, request_id: str) -> None:
        """Nobody waits for the request any more: stop following it and cancel it on the fleet.

        The cancel is its own task, so it goes out even though the caller is being cancelled
        (a disconnected HTTP client cancels the task streaming to it)."""
        self.client.forget(request_id)
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self.client.cancel(request_id)
            self.cancelled += 1
            log.info("gateway_request_cancelled", request_id=request_id)
        except Exception as exc:
            log.warning("gateway_cancel_failed", request_id=request_id, error=repr(exc)[:200])
