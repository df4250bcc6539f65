"""Client: produce requests and follow their tokens and events.

The client reads `<prefix>.tokens` and `<prefix>.events` outside any consumer group, from the end
of each partition as of `start()`. For each request it follows the newest attempt (announced by a
`started` event) and drops the partial stream of a superseded one; the outcome is the first
terminal event, and the text is the token chunks of the attempt that event names.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.protocol import Event, EventType, GenerationRequest, TokenChunk


class UpdateKind(enum.StrEnum):
    TEXT = "text"  # new text of the current attempt
    RESTART = "restart"  # a new attempt started: discard text shown so far
    EVENT = "event"  # a lifecycle event (the last one yielded is the outcome)


@dataclass(frozen=True)
class Update:
    kind: UpdateKind
    text: str = ""
    event: Event | None = None
    attempt: str | None = None
    tokens: int = 0  # token ids behind a TEXT update (a chunk may hold several)


@dataclass
class Result:
    request_id: str
    outcome: Event
    text: str
    attempt: str | None
    token_ids: list[int]
    attempts_seen: int
    events: list[Event]


@dataclass
class _Attempt:
    chunks: dict[int, TokenChunk] = field(default_factory=dict)
    emitted_to: int = 0  # next token index to emit


class RequestHandle:
    """Follows one request. Iterate for live updates, or await `result()`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._attempts: dict[str, _Attempt] = {}
        self._current: str | None = None
        self._outcome: Event | None = None
        self._done = asyncio.Event()
        self.events: list[Event] = []
        self.duplicate_chunks = 0

    # -- fed by the client's reader task
    def _on_chunk(self, chunk: TokenChunk) -> None:
        attempt = self._attempts.setdefault(chunk.attempt, _Attempt())
        if chunk.index in attempt.chunks:
            self.duplicate_chunks += 1  # the protocol never re-emits an index within an attempt
        attempt.chunks[chunk.index] = chunk
        if self._current is None:
            self._current = chunk.attempt
        if chunk.attempt == self._current:
            self._emit_ready(attempt)
        self._maybe_done()

    def _on_event(self, event: Event) -> None:
        if self._outcome is not None:
            return  # later terminal events for the id are duplicates of an at-least-once retry
        self.events.append(event)
        if event.type is EventType.STARTED and event.attempt and event.attempt != self._current:
            restarted = self._current is not None
            self._current = event.attempt
            if restarted:
                self._updates.put_nowait(Update(UpdateKind.RESTART, attempt=event.attempt))
            self._emit_ready(self._attempts.setdefault(event.attempt, _Attempt()))
        self._updates.put_nowait(Update(UpdateKind.EVENT, event=event, attempt=event.attempt))
        if event.type.is_terminal:
            self._outcome = event
            if event.attempt and event.attempt != self._current:
                self._current = event.attempt
                self._updates.put_nowait(Update(UpdateKind.RESTART, attempt=event.attempt))
                self._emit_ready(self._attempts.setdefault(event.attempt, _Attempt()))
            self._maybe_done()

    def _emit_ready(self, attempt: _Attempt) -> None:
        while attempt.emitted_to in attempt.chunks:
            chunk = attempt.chunks[attempt.emitted_to]
            self._updates.put_nowait(
                Update(UpdateKind.TEXT, text=chunk.text, attempt=chunk.attempt,
                       tokens=len(chunk.token_ids))
            )
            attempt.emitted_to += max(1, len(chunk.token_ids))

    def _maybe_done(self) -> None:
        outcome = self._outcome
        if outcome is None or self._done.is_set():
            return
        if outcome.type is EventType.COMPLETED and outcome.usage is not None:
            attempt = self._attempts.get(outcome.attempt or "", _Attempt())
            if attempt.emitted_to < outcome.usage.completion_tokens:
                return  # the outcome can overtake its last chunks (different topics): wait
        self._done.set()

    # -- public
    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def updates(self) -> AsyncIterator[Update]:
        """Live updates until the outcome; RESTART means drop the text shown so far."""
        while True:
            if self._done.is_set() and self._updates.empty():
                return
            getter = asyncio.ensure_future(self._updates.get())
            waiter = asyncio.ensure_future(self._done.wait())
            finished, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if getter in finished:
                yield getter.result()
            else:
                getter.cancel()

    async def result(self, timeout: float | None = None) -> Result:
        await asyncio.wait_for(self._done.wait(), timeout)
        outcome = self._outcome
        assert outcome is not None
        attempt = self._attempts.get(outcome.attempt or "", _Attempt())
        ordered = [attempt.chunks[i] for i in sorted(attempt.chunks)]
        return Result(
            request_id=self.request_id,
            outcome=outcome,
            text="".join(c.text for c in ordered),
            attempt=outcome.attempt,
            token_ids=[t for c in ordered for t in c.token_ids],
            attempts_seen=len([e for e in self.events if e.type is EventType.STARTED]),
            events=list(self.events),
        )


class StreamerClient:
    def __init__(self, kafka: KafkaSettings | None = None, prefix: str = "llm") -> None:
        self.kafka = kafka or KafkaSettings.from_env()
        self.prefix = prefix
        self._producer = AIOKafkaProducer(
            **self.kafka.client_kwargs(),
            enable_idempotence=False,
            linger_ms=0,
            max_request_size=2_000_000,
        )
        self._consumer = AIOKafkaConsumer(
            **self.kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
        )
        self._handles: dict[str, RequestHandle] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> StreamerClient:
        await self._producer.start()
        await self._consumer.start()
        tps = []
        for topic in (protocol.tokens_topic(self.prefix), protocol.events_topic(self.prefix)):
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                await self._consumer.topics()  # refreshes metadata
                partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                raise RuntimeError(f"topic {topic} does not exist: run `streamer topics apply`")
            tps += [TopicPartition(topic, p) for p in partitions]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so nothing produced after start() is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="client-reader")
        return self

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        await cancel_and_wait(reader)
        await self._consumer.stop()
        await self._producer.stop()

    async def __aenter__(self) -> StreamerClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(
        self,
        prompt: str | None = None,
        *,
        priority: str = "normal",
        request_id: str | None = None,
        messages: list[dict[str, str]] | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        **fields: Any,
    ) -> RequestHandle:
        """Produce a request on `<prefix>.requests.<priority>` and return its handle."""
        if priority not in protocol.PRIORITIES:
            raise ValueError(f"priority {priority!r}; expected one of {protocol.PRIORITIES}")
        request_id = request_id or uuid.uuid4().hex
        request = msgspec.convert(
            {"id": request_id, "prompt": prompt, "messages": messages, **fields}, GenerationRequest
        )
        handle = RequestHandle(request_id)
        self._handles[request_id] = handle
        await self.produce_raw(
            protocol.encode(request), priority=priority, key=request_id.encode(), headers=headers
        )
        return handle

    async def produce_raw(
        self,
        value: bytes,
        *,
        priority: str = "normal",
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Produce arbitrary bytes to a request topic (tests and tools)."""
        out = [
            ("content-type", b"application/json"),
            (protocol.PROTOCOL_HEADER, str(protocol.PROTOCOL_VERSION).encode()),
        ]
        await self._producer.send_and_wait(
            protocol.request_topic(self.prefix, priority),
            value,
            key=key,
            headers=out + list(headers or []),
        )

    @property
    def open_requests(self) -> int:
        """Requests whose outcome has not been delivered yet (their handles are held)."""
        return len(self._handles)

    def follow(self, request_id: str) -> RequestHandle:
        """Follow a request produced elsewhere (from now on)."""
        return self._handles.setdefault(request_id, RequestHandle(request_id))

    async def cancel(self, request_id: str) -> None:
        message = protocol.ControlMessage(type="cancel", request_id=request_id)
        await self._producer.send_and_wait(
            protocol.control_topic(self.prefix), protocol.encode(message), key=request_id.encode()
        )

    async def _read(self) -> None:
        tokens_topic = protocol.tokens_topic(self.prefix)
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    handle = self._handles.get((record.key or b"").decode("utf-8", "replace"))
                    if handle is None:
                        continue
                    try:
                        if record.topic == tokens_topic:
                            handle._on_chunk(protocol.decode_chunk(record.value))
                        else:
                            handle._on_event(protocol.decode_event(record.value))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # not ours to judge: another producer's message on the topic
                    if handle.done:  # the outcome is delivered: later messages are duplicates
                        self._handles.pop(handle.request_id, None)
