"""Publishing what happens to each request: its stream of tokens and events, and its outcome.

Every path ends in exactly one of: an acknowledged terminal event or DLQ copy (then `on_done`
marks the record finished, so its offset can be committed), or a hand-back (no outcome: the
record stays uncommitted and the next owner serves it). An outcome too large to produce is
replaced by a small `failed` event (`output_too_large`); it is never simply lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka.structs import ConsumerRecord

from streamer import protocol
from streamer.egress import events
from streamer.egress.coalesce import ChunkBudget, Coalescer
from streamer.egress.progress import ProgressTrail
from streamer.egress.publisher import OutputTooLarge, Publisher, PublisherStopped
from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream
from streamer.intake.flights import Flight
from streamer.intake.records import RecordId
from streamer.observability.metrics import WorkerMetrics
from streamer.protocol import ErrorCode, Event, EventType

log = structlog.get_logger(__name__)

OnDone = Callable[[RecordId, Flight | None], None]
"""(record, flight) once an outcome for the record is acknowledged."""


@dataclass(frozen=True)
class ProgressPolicy:
    """How attempts record progress: a record after `every_tokens` acknowledged tokens or
    `every_s` seconds, in the progress topic's partition `request partition % partitions`."""

    partitions: int
    every_tokens: int
    every_s: float


class Outcomes:
    def __init__(
        self, publisher: Publisher, metrics: WorkerMetrics, worker: str, on_done: OnDone, *,
        chunk_s: float = 0.0, chunk_tokens: int = 8, chunk_records_per_s: float = 0.0,
        progress: ProgressPolicy | None = None,
        seed_of: Callable[[str], int | None] = lambda _: None,
    ) -> None:
        self.budget = ChunkBudget(chunk_s, chunk_records_per_s)
        """Shared by every attempt: its window stretches with the streams it counts."""
        self.chunk_tokens = chunk_tokens
        self.progress = progress
        """Where and how often attempts record their progress; None: they do not."""
        self.seed_of = seed_of
        self.publisher = publisher
        self.metrics = metrics
        self.worker = worker
        self.on_done = on_done
        self.tasks: set[asyncio.Task[Any]] = set()
        self.failures = 0

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures += 1
            log.error("task_failed", error=repr(task.exception()))
            self.metrics.errors.labels(kind="internal").inc()

    # ------------------------------------------------------------------ without generation

    async def publish_terminal(self, rid: RecordId, priority: str, event: Event) -> None:
        """An outcome decided at intake (rejected, cancelled or expired before serving)."""
        event = events.fit(event, self.publisher.max_bytes)
        if await self._deliver(event, None):
            self._done(rid, priority, str(event.type), None)

    async def dead_letter(
        self, record: ConsumerRecord[Any, Any], rid: RecordId, priority: str,
        code: ErrorCode | str, message: str,
    ) -> None:
        message = events.truncate(message)
        try:
            ack = await self.publisher.send_dead_letter(
                value=record.value, key=record.key, source_topic=record.topic,
                partition=record.partition, offset=record.offset, error=str(code),
                message=message, headers=record.headers or (),
            )
            await ack
        except PublisherStopped:
            return  # shutting down: the record stays uncommitted and is read again
        log.warning("dead_letter", topic=record.topic, partition=record.partition,
                    offset=record.offset, error=str(code), reason=message)
        self.metrics.errors.labels(kind=str(code)).inc()
        self._done(rid, priority, "dlq", None)

    async def dead_letter_stub(self, topic: str, partition: int, offset: int, error: str,
                               priority: str) -> None:
        """A record the Kafka client could not decode: its position and the error, no content."""
        ack = await self.publisher.send_dead_letter(
            value=None, key=f"{topic}/{partition}/{offset}".encode(), source_topic=topic,
            partition=partition, offset=offset,
            error=str(ErrorCode.UNDECODABLE),
            message=f"the Kafka client cannot decode it: {error}",
        )
        await ack
        log.warning("dead_letter_stub", topic=topic, partition=partition, offset=offset,
                    error=error[:300])
        self.metrics.errors.labels(kind=str(ErrorCode.UNDECODABLE)).inc()
        self.metrics.requests.labels(priority=priority, outcome="dlq").inc()

    # ------------------------------------------------------------------ serving

    async def serve(self, flight: Flight, is_current: Callable[[], bool]) -> None:
        """Follow one attempt's engine stream to its outcome (or its hand-back)."""
        request = flight.request
        bound = log.bind(request_id=request.id, attempt=flight.attempt, priority=flight.priority)
        acks: list[asyncio.Future[Any]] = []
        started = first_token = None
        produced = flight.record.timestamp / 1000
        trail = flight.trail = self._trail(flight)
        streaming = False  # counted in the chunk budget's streams
        try:
            acks.append(await self._event(flight, EventType.QUEUED, attempt=False))
            hit = flight.cache is not None and flight.cache.level is not None
            # A replay sends each stored chunk as it was (window 0: no merging).
            coalescer = Coalescer(0.0, self.chunk_tokens) if hit else \
                Coalescer(self.budget.window_s, self.chunk_tokens, self.budget)
            async for arrived, now in _timed(flight.stream, coalescer):
                due = coalescer.take(now) if arrived is None else coalescer.push(arrived, now)
                for out in due:
                    if out.kind is OutputKind.STARTED:
                        started = time.time()
                        acks.append(await self._event(flight, EventType.STARTED,
                                                      resumed=flight.resumed))
                        self.metrics.request_queue_time.labels(flight.priority).observe(
                            max(0.0, started - produced)
                        )
                    elif out.kind is OutputKind.TOKENS:
                        if first_token is None and out.token_ids:
                            first_token = time.time()
                            if not hit:
                                streaming, self.budget.streams = True, self.budget.streams + 1
                        chunk = protocol.TokenChunk(
                            request_id=request.id, attempt=flight.attempt, index=out.index,
                            token_ids=out.token_ids, text=out.text,
                        )
                        ack = await self.publisher.send_chunk(
                            chunk, priority=flight.priority, traceparent=flight.traceparent
                        )
                        acks.append(ack)
                        if flight.cache is not None:
                            flight.cache.chunk(out.token_ids, out.text)
                        if trail is not None:
                            trail.chunk(out.token_ids, out.text, ack)
                        self.metrics.generation_tokens.inc(len(out.token_ids))
                    elif out.kind is OutputKind.PREEMPTED:
                        self.metrics.num_preemptions.inc()
                        acks.append(await self._event(flight, EventType.PREEMPTED))
                    elif out.kind is OutputKind.FINISHED:
                        clock = events.Clock(produced, started, first_token, time.time())
                        await self._finish(flight, out, acks, clock, bound, is_current, trail)
                        return
        except PublisherStopped:
            bound.info("request_handed_back", reason="publisher stopped")
        finally:
            if streaming:
                self.budget.streams -= 1
            if trail is not None:
                trail.close()

    def _trail(self, flight: Flight) -> ProgressTrail | None:
        policy = self.progress
        if policy is None:
            return None
        record = flight.record
        return ProgressTrail(
            self.publisher, self.spawn, on_record=self.metrics.progress_records.inc,
            request_id=flight.request.id, attempt=flight.attempt,
            record=(record.topic, record.partition, record.offset),
            partition=record.partition % policy.partitions, prompt_tokens=flight.prompt_tokens,
            resumed=flight.resumed, base=flight.resume_base, seed=self.seed_of(flight.request.id),
            every_tokens=policy.every_tokens, every_s=policy.every_s,
        )

    async def _event(self, flight: Flight, type_: EventType, attempt: bool = True,
                     **fields: Any) -> asyncio.Future[Any]:
        event = self.publisher.event(
            flight.request.id, type_, attempt=flight.attempt if attempt else None,
            priority=flight.priority, **fields,
        )
        return await self.publisher.send_event(event, traceparent=flight.traceparent)

    async def _finish(
        self, flight: Flight, out: RequestOutput, acks: list[asyncio.Future[Any]],
        clock: events.Clock, bound: Any, is_current: Callable[[], bool],
        trail: ProgressTrail | None,
    ) -> None:
        if out.finish_reason == "revoked":
            if trail is not None:  # the next owner continues from every acknowledged token
                await trail.checkpoint()
                trail.close()
            bound.info("request_handed_back")  # no outcome: its offset stays uncommitted
            return
        publish_began = time.time()
        results = await asyncio.gather(*acks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(e, PublisherStopped) for e in errors):
            raise PublisherStopped("outputs not acknowledged")
        request = flight.request
        event = events.outcome(
            request_id=request.id, worker=self.worker, attempt=flight.attempt,
            priority=flight.priority, finish_reason=out.finish_reason or "failed",
            text=out.final_text or "", prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_completion_tokens, clock=clock,
            metadata=request.metadata, error=out.error,
            cache=flight.cache.level if flight.cache is not None else None,
        )
        if errors:  # a chunk that can never be produced: the attempt cannot be read in full
            event = events.output_too_large(event, self.publisher.max_bytes)
        event = events.fit(event, self.publisher.max_bytes)
        if not is_current():
            bound.info("request_handed_back", reason="partition moved")
            return
        if not await self._deliver(event, flight.traceparent):
            return
        if trail is not None:
            await trail.clear()
        if event.type is EventType.FAILED:
            self.metrics.errors.labels(kind="model").inc()
        self._done(flight.rid, flight.priority, str(event.type), flight)
        if flight.cache is not None and not errors:  # a miss that completed fills the cache
            flight.cache.completed(event)
        self._observe(flight, out, event.type, clock)
        done = time.time()
        ms = lambda a, b: round(max(0.0, b - a) * 1000, 1) if a and b else None  # noqa: E731
        # One summary line per request: where its time went.
        bound.info(
            "request_finished",
            outcome=str(event.type),
            reason=out.finish_reason,
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_completion_tokens,
            queue_ms=ms(clock.produced, clock.started),
            tokenize_ms=round(flight.tokenize_s * 1000, 2),
            prefill_ms=ms(clock.started, clock.first_token),
            decode_ms=ms(clock.first_token, publish_began),
            publish_ms=ms(publish_began, done),
            e2e_ms=ms(clock.produced, done),
        )

    async def _deliver(self, event: Event, traceparent: bytes | None) -> bool:
        """Produce an outcome and wait for the broker; False if the publisher stopped first."""
        try:
            await (await self.publisher.send_event(event, traceparent=traceparent))
        except OutputTooLarge:  # the broker refused it: the small stand-in always fits
            small = events.output_too_large(event, self.publisher.max_bytes)
            try:
                await (await self.publisher.send_event(small))
            except PublisherStopped:
                return False
        except PublisherStopped:
            return False
        return True

    def _done(self, rid: RecordId, priority: str, outcome: str, flight: Flight | None) -> None:
        self.metrics.requests.labels(priority=priority, outcome=outcome).inc()
        self.on_done(rid, flight)

    def _observe(
        self, flight: Flight, out: RequestOutput, event_type: EventType, clock: events.Clock
    ) -> None:
        m, p = self.metrics, flight.priority
        m.prompt_tokens.inc(out.num_prompt_tokens)
        m.e2e_request_latency.labels(p).observe(max(0.0, clock.now - clock.produced))
        if clock.first_token is not None:
            m.time_to_first_token.labels(p).observe(max(0.0, clock.first_token - clock.produced))
            if out.num_completion_tokens > 1:
                m.time_per_output_token.labels(p).observe(
                    (clock.now - clock.first_token) / (out.num_completion_tokens - 1)
                )



async def _timed(
    stream: RequestStream, coalescer: Coalescer
) -> AsyncIterator[tuple[RequestOutput | None, float]]:
    """The stream's outputs with their arrival time; `(None, now)` when the coalescer's flush
    deadline passes first (then its pending tokens go out)."""
    loop = asyncio.get_running_loop()
    while not stream.finished:
        deadline = coalescer.deadline()
        if deadline is None:
            yield await stream.get(), loop.time()
            continue
        try:
            out = await asyncio.wait_for(stream.get(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            yield None, loop.time()
        else:
            yield out, loop.time()
