"""Producing outputs: token chunks, lifecycle events and dead letters, keyed by request id.

Every send returns a future that resolves once the broker has acknowledged the message. Sends are
not awaited one by one; the terminal event of an attempt is produced only after every chunk of
that attempt is acknowledged. No output is given up on while the broker is away: a failed send
is retried with backoff until it is acknowledged or the publisher stops. A message that can never
be sent (larger than `max_bytes`, or refused by the broker as too large) fails its future with
`OutputTooLarge`, so the caller can replace it with a small terminal event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordListTooLargeError,
)

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.protocol import Event, EventType, Progress, TokenChunk
from streamer.validation import record_size

log = structlog.get_logger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 1_000_000
"""Kafka's default `message.max.bytes` is 1 MiB; stay under it with headers and framing."""
DLQ_MAX_VALUE_BYTES = 900_000
RETRY_BACKOFF_S = (0.1, 5.0)


class OutputTooLarge(Exception):
    """The message can never be produced; replace it with something smaller."""


class PublisherStopped(Exception):
    """The publisher stopped before the broker acknowledged the message."""


Headers = list[tuple[str, bytes]]


@dataclass(eq=False)
class _Delivery:
    """One message until the broker acknowledges it (or it is given up)."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    partition: int | None = None
    tries: int = 0
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Publisher:
    def __init__(
        self,
        kafka: KafkaSettings,
        prefix: str,
        worker: str,
        *,
        max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        on_record: Callable[[str, int], None] | None = None,
    ) -> None:
        self.worker = worker
        self.on_record = on_record
        """Called with (kind: tokens | events | dlq, bytes) for each message handed over."""
        self.max_bytes = max_bytes
        self.tokens_topic = protocol.tokens_topic(prefix)
        self.events_topic = protocol.events_topic(prefix)
        self.dlq_topic = protocol.dlq_topic(prefix)
        self.progress_topic = protocol.progress_topic(prefix)
        self._producer = AIOKafkaProducer(
            **kafka.client_kwargs(),
            acks="all",
            linger_ms=5,
            # Idempotence stays off: the embedded broker only speaks InitProducerId v0.
            enable_idempotence=False,
            max_request_size=2 * max_bytes,
            request_timeout_ms=30_000,
        )
        self._started = False
        self._stopping = False
        self._outstanding = 0
        self._retries: set[asyncio.Task[None]] = set()
        self.retried = 0
        self._kinds = {self.tokens_topic: "tokens", self.events_topic: "events",
                       self.dlq_topic: "dlq", self.progress_topic: "progress"}

    async def start(self) -> None:
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self, timeout: float = 10.0) -> None:
        """Flush what is pending for up to `timeout` seconds, then close; idempotent."""
        if not self._started:
            return
        self._started = False
        self._stopping = True
        try:
            await asyncio.wait_for(self._producer.flush(), timeout)
        except (TimeoutError, KafkaError) as exc:
            log.warning("publisher_flush_incomplete", outstanding=self._outstanding,
                        error=repr(exc)[:200])
        await cancel_and_wait(*self._retries)
        try:
            await asyncio.wait_for(self._producer.stop(), timeout)
        except TimeoutError:
            log.warning("publisher_close_timed_out")

    async def flush(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._producer.flush(), timeout)

    @property
    def outstanding(self) -> int:
        """Messages handed to the publisher and not yet acknowledged (or given up) by the broker."""
        return self._outstanding

    async def probe(self, timeout: float) -> bool:
        """Whether the broker answers a metadata request within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ sending

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Hand one message to the producer; the future resolves when the broker has it."""
        delivery = _Delivery(topic, value, key, headers, partition)
        size = record_size(value, headers) + len(key or b"")
        if size > self.max_bytes:
            delivery.done.set_exception(
                OutputTooLarge(f"{topic} message over {self.max_bytes} bytes")
            )
            return delivery.done
        self._outstanding += 1
        if self.on_record is not None:  # counted once, however often it is retried
            self.on_record(self._kinds.get(topic, topic), size)
        delivery.done.add_done_callback(self._settled)
        await self._attempt(delivery)
        return delivery.done

    def _settled(self, _: asyncio.Future[Any]) -> None:
        self._outstanding -= 1

    async def _attempt(self, d: _Delivery) -> None:
        try:
            ack = await self._producer.send(d.topic, d.value, key=d.key, headers=d.headers,
                                            partition=d.partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(d, exc)
            return

        def acked(future: asyncio.Future[Any]) -> None:
            if d.done.done():
                return
            if future.cancelled():
                self._failed(d, ProducerClosed())
            elif (exc := future.exception()) is not None:
                self._failed(d, exc)
            else:
                d.done.set_result(future.result())

        ack.add_done_callback(acked)

    def _failed(self, d: _Delivery, exc: BaseException) -> None:
        """Give up (too large, stopping, a bug) or retry with backoff (the broker is away)."""
        if d.done.done():
            return
        if isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError):
            d.done.set_exception(OutputTooLarge(f"{d.topic}: {exc!r}"))
            return
        if self._stopping:
            d.done.set_exception(PublisherStopped(repr(exc)))
            return
        if not isinstance(exc, KafkaError | ConnectionError | TimeoutError):
            d.done.set_exception(exc)  # a bug, not an outage: retrying would not help
            return
        if d.tries % 20 == 0:
            log.warning("output_send_retrying", topic=d.topic, tries=d.tries + 1,
                        error=repr(exc)[:200])
        d.tries += 1
        self.retried += 1
        task = asyncio.get_running_loop().create_task(self._retry(d))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, d: _Delivery) -> None:
        low, high = RETRY_BACKOFF_S
        try:
            await asyncio.sleep(min(high, low * 2 ** min(d.tries, 10)))
        except asyncio.CancelledError:
            if not d.done.done():
                d.done.set_exception(PublisherStopped("stopped while retrying"))
            raise
        if not d.done.done():
            await self._attempt(d)

    # ------------------------------------------------------------------ messages

    async def send_chunk(
        self, chunk: TokenChunk, *, priority: str, traceparent: bytes | None
    ) -> asyncio.Future[Any]:
        headers = protocol.output_headers(
            chunk.request_id, "token", priority=priority, attempt=chunk.attempt,
            traceparent=traceparent,
        )
        return await self.send(
            self.tokens_topic, protocol.encode(chunk), chunk.request_id.encode(), headers
        )

    async def send_event(
        self, event: Event, *, traceparent: bytes | None = None
    ) -> asyncio.Future[Any]:
        headers = protocol.output_headers(
            event.request_id, str(event.type), priority=event.priority, attempt=event.attempt,
            traceparent=traceparent,
        )
        return await self.send(
            self.events_topic, protocol.encode(event), event.request_id.encode(), headers
        )

    async def send_progress(
        self, request_id: str, progress: Progress | None, partition: int
    ) -> asyncio.Future[Any]:
        """A progress record, or the request's tombstone (None), in `partition` of the progress
        topic: the partition of its request record, so its next owner finds it there."""
        value = None if progress is None else protocol.encode(progress)
        headers = protocol.output_headers(request_id, "progress" if progress else "tombstone")
        return await self.send(self.progress_topic, value, request_id.encode(), headers,
                               partition=partition)

    async def partitions_of(self, topic: str) -> int | None:
        """Partition count of a topic from the producer's metadata (None if it has none)."""
        parts = await self._producer.partitions_for(topic)
        return len(parts) if parts else None

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
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> asyncio.Future[Any]:
        """Copy the original record with headers naming where it came from and why.

        The copy always fits: a long value is cut (`truncated`, `original-size`), and original
        headers that would not fit beside it are dropped (`dlq-headers-dropped`)."""
        ours: Headers = [
            ("dlq-source-topic", source_topic.encode()),
            ("dlq-source-partition", str(partition).encode()),
            ("dlq-source-offset", str(offset).encode()),
            ("dlq-error", error.encode()),
            ("dlq-error-message", message.encode("utf-8", "replace")[:1000]),
            ("dlq-worker", self.worker.encode()),
        ]
        if value is not None and len(value) > DLQ_MAX_VALUE_BYTES:
            ours += [("truncated", b"true"), ("original-size", str(len(value)).encode())]
            value = value[:DLQ_MAX_VALUE_BYTES]
        original: Headers = [(k, v or b"") for k, v in headers if not k.startswith("dlq-")]
        room = self.max_bytes - record_size(value, ours) - len(key or b"") - 1024
        if record_size(None, original) > room:
            ours.append(("dlq-headers-dropped", str(len(original)).encode()))
            original = []
        key = key if key is None or len(key) <= 1024 else key[:1024]
        return await self.send(self.dlq_topic, value, key, original + ours)
