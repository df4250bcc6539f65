"""Producing outputs: token chunks, lifecycle events and dead letters, keyed by request id.

Token sends are not awaited one by one (`send` returns a future); the terminal event of an attempt
is produced only after every chunk of that attempt is acknowledged, and the caller awaits it before
marking the request's offset finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from streamer import protocol
from streamer.config import KafkaSettings
from streamer.protocol import Event, EventType, TokenChunk

DLQ_MAX_VALUE_BYTES = 900_000


class Publisher:
    def __init__(self, kafka: KafkaSettings, prefix: str, worker: str) -> None:
        self.prefix = prefix
        self.worker = worker
        self.tokens_topic = protocol.tokens_topic(prefix)
        self.events_topic = protocol.events_topic(prefix)
        self.dlq_topic = protocol.dlq_topic(prefix)
        self._producer = AIOKafkaProducer(
            **kafka.client_kwargs(),
            acks="all",
            linger_ms=5,
            # Idempotence stays off: the embedded broker only speaks InitProducerId v0.
            enable_idempotence=False,
            max_request_size=2_000_000,
            request_timeout_ms=30_000,
        )
        self._started = False
        self._outstanding = 0

    async def start(self) -> None:
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.flush()
            await self._producer.stop()

    @property
    def outstanding(self) -> int:
        """Messages handed to the producer and not yet acknowledged (or failed) by the broker."""
        return self._outstanding

    def _track(self, ack: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._outstanding += 1
        ack.add_done_callback(self._acked)
        return ack

    def _acked(self, _: asyncio.Future[Any]) -> None:
        self._outstanding -= 1

    async def probe(self, timeout: float) -> bool:
        """Whether the broker answers a metadata request within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return True

    async def flush(self) -> None:
        await self._producer.flush()

    async def send_chunk(
        self, chunk: TokenChunk, *, priority: str, traceparent: bytes | None
    ) -> asyncio.Future[Any]:
        return await self._send_output(
            self.tokens_topic,
            chunk,
            chunk.request_id,
            "token",
            priority,
            chunk.attempt,
            traceparent,
        )

    async def send_event(
        self, event: Event, *, traceparent: bytes | None = None
    ) -> asyncio.Future[Any]:
        return await self._send_output(
            self.events_topic,
            event,
            event.request_id,
            str(event.type),
            event.priority,
            event.attempt,
            traceparent,
        )

    async def _send_output(
        self,
        topic: str,
        message: TokenChunk | Event,
        request_id: str,
        event_type: str,
        priority: str | None,
        attempt: str | None,
        traceparent: bytes | None,
    ) -> asyncio.Future[Any]:
        """Keyed by request id, readable headers; returns the broker's acknowledgement future."""
        headers = protocol.output_headers(
            request_id, event_type, priority=priority, attempt=attempt, traceparent=traceparent
        )
        ack = await self._producer.send(
            topic, protocol.encode(message), key=request_id.encode(), headers=headers
        )
        return self._track(ack)

    def event(self, request_id: str, type_: EventType, **fields: Any) -> Event:
        return Event(
            request_id=request_id, type=type_, worker=self.worker, ts=protocol.now_ms(), **fields
        )

    async def send_dead_letter(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        source_topic: str,
        partition: int,
        offset: int,
        error: str,
        message: str,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> asyncio.Future[Any]:
        """Copy the original record with headers naming where it came from and why."""
        out_headers = [(k, v) for k, v in headers if not k.startswith("dlq-")]
        out_headers += [
            ("dlq-source-topic", source_topic.encode()),
            ("dlq-source-partition", str(partition).encode()),
            ("dlq-source-offset", str(offset).encode()),
            ("dlq-error", error.encode()),
            ("dlq-error-message", message.encode("utf-8", "replace")[:1000]),
            ("dlq-worker", self.worker.encode()),
        ]
        if value is not None and len(value) > DLQ_MAX_VALUE_BYTES:
            out_headers += [("truncated", b"true"), ("original-size", str(len(value)).encode())]
            value = value[:DLQ_MAX_VALUE_BYTES]
        return self._track(
            await self._producer.send(self.dlq_topic, value, key=key, headers=out_headers)
        )
