"""The worker: intake -> engine -> publisher, with commits that never run ahead of outcomes.

Commit path, per partition:
 1. A consumed record is tracked as unfinished.
 2. Its outcome (terminal event, DLQ copy) is produced and acknowledged by the broker.
 3. Only then is its offset finished in the OffsetTracker.
 4. The commit loop commits the lowest unfinished offset (or last finished + 1) per partition.
A crash therefore redelivers every request that had no acknowledged outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import WorkerConfig
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream
from streamer.engine.sequence import SamplingParams
from streamer.kafka.control import ControlListener
from streamer.kafka.offsets import OffsetTracker
from streamer.kafka.publisher import Publisher
from streamer.observability.http import MetricsServer
from streamer.observability.metrics import WorkerMetrics, render
from streamer.protocol import ErrorCode, EventType, GenerationRequest
from streamer.topics import apply_topics
from streamer.validation import DeadLetter, Rejection, parse_request

log = structlog.get_logger(__name__)

RECENTLY_FINISHED = 10_000
TERMINAL_BY_REASON = {
    "eos": EventType.COMPLETED,
    "length": EventType.COMPLETED,
    "stop": EventType.COMPLETED,
    "cancelled": EventType.CANCELLED,
    "expired": EventType.EXPIRED,
    "failed": EventType.FAILED,
}
RecordKey = tuple[str, int, int]


@dataclass
class InFlight:
    request: GenerationRequest
    record: ConsumerRecord[Any, Any]
    priority: str
    stream: RequestStream
    prompt_tokens: int
    tokenize_s: float = 0.0
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> RecordKey:
        return (self.record.topic, self.record.partition, self.record.offset)

    @property
    def traceparent(self) -> bytes | None:
        return next((v for k, v in self.record.headers or () if k == "traceparent"), None)


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        self.name = config.name if config.worker_id else f"{socket.gethostname()}-{os.getpid()}"
        self.log = log.bind(worker=self.name)
        self.lanes = {
            protocol.request_topic(config.prefix, p): (i, p)
            for i, p in enumerate(protocol.PRIORITIES)
        }
        self.engine = Engine(config.engine)
        self.metrics = WorkerMetrics(model=config.engine.model, worker=self.name)
        self.publisher = Publisher(config.kafka, config.prefix, self.name)
        self.offsets = OffsetTracker()
        self.control = ControlListener(
            config.kafka, config.prefix, config.cancel_window_s, self._on_cancel
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.server = MetricsServer(
            lambda: render(self.metrics),
            healthy=self._healthy,
            ready=self._ready,
            port=config.metrics_port,
        )
        self._inflight: dict[str, InFlight] = {}
        self._by_record: dict[RecordKey, str] = {}
        self._recently_finished: OrderedDict[RecordKey, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._paused: set[str] = set()
        self._assigned = False
        self._stopping = asyncio.Event()
        self._busy_reported = [0.0] * len(config.engine.devices)
        self._broker_ok = True
        self._outputs_blocked = False
        self.output_pauses = 0
        self._stall: str | None = None

    # ------------------------------------------------------------------ health

    def _healthy(self) -> tuple[bool, str]:
        if self.engine.fatal is not None:
            return False, f"engine failed: {self.engine.fatal!r}"
        if self._stall is not None:
            return False, self._stall
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if self.engine.scheduler is None:
            return False, "model not loaded"
        if not self._assigned:
            return False, "not a member of the consumer group (no partitions assigned)"
        if not self._broker_ok:
            return False, "broker unreachable"
        if self._stopping.is_set():
            return False, "stopping"
        return True, "ok"

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        cfg = self.config
        await self.server.start()
        self.log.info("metrics_listening", port=self.server.port)
        self.metrics.set_info(
            version=self.metrics_version(), model=cfg.engine.model, worker=self.name
        )
        if cfg.apply_topics:
            report = await apply_topics(cfg.kafka, cfg.prefix)
            for line in report.lines():
                self.log.info("topic", state=line)
        await self.engine.start()
        self.engine.on_step = self._on_step
        await self.publisher.start()
        await self.control.start()
        self.consumer = AIOKafkaConsumer(
            **cfg.kafka.client_kwargs(),
            group_id=cfg.consumer_group,
            group_instance_id=cfg.group_instance_id,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=64,
            fetch_max_wait_ms=20,  # latency: the broker otherwise holds an empty fetch for 500 ms
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        # Explicit names, never a pattern that could match the DLQ or the outputs.
        self.consumer.subscribe(list(self.lanes), listener=_Rebalance(self))
        await self.consumer.start()
        self.log.info("worker_started", group=cfg.consumer_group, topics=list(self.lanes))
        committer = asyncio.create_task(self._commit_loop(), name="commit-loop")
        health = asyncio.create_task(self._health_loop(), name="health-loop")
        try:
            await self._intake_loop()
        finally:
            await cancel_and_wait(health)
            await self._shutdown(committer)

    @staticmethod
    def metrics_version() -> str:
        import streamer

        return streamer.__version__

    async def _shutdown(self, committer: asyncio.Task[None]) -> None:
        """Stop fetching, let in-flight work finish within the grace period, hand back the rest."""
        self.log.info("worker_stopping", inflight=len(self._inflight))
        self.metrics.set_ready(False)
        pending = [f.task for f in self._inflight.values() if f.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
        for request_id in list(self._inflight):
            self.engine.abort(request_id, "revoked")  # uncommitted: the next owner redoes it
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await cancel_and_wait(committer)
        with contextlib.suppress(Exception):
            await self.publisher.flush()
        await self._commit()
        for stop in (
            self.control.stop,
            self._stop_consumer,
            self.publisher.stop,
            self.engine.stop,
            self.server.stop,
        ):
            with contextlib.suppress(Exception):
                await stop()
        self.log.info("worker_stopped")

    async def _stop_consumer(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()  # leaves the group

    # ------------------------------------------------------------------ intake

    async def _intake_loop(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            if self.engine.fatal is not None:
                raise RuntimeError("engine failed") from self.engine.fatal
            batches = await self.consumer.getmany(timeout_ms=100, max_records=64)
            for records in batches.values():
                for record in records:
                    await self._on_record(record)
            self._apply_backpressure()
            self._refresh_gauges()

    async def _on_record(self, record: ConsumerRecord[Any, Any]) -> None:
        key: RecordKey = (record.topic, record.partition, record.offset)
        self.offsets.track(*key)
        if key in self._by_record:
            return  # a redelivered copy of a record this worker is serving: it joins that one
        if key in self._recently_finished:
            self.offsets.finish(*key)
            return
        lane, priority = self.lanes[record.topic]
        parsed = parse_request(record.value, record.headers or (), self.config.limits)
        if isinstance(parsed, DeadLetter):
            self._spawn(self._dead_letter(record, parsed.code, parsed.message))
            return
        if isinstance(parsed, Rejection):
            self._spawn(self._reject(record, priority, parsed))
            return
        request = parsed
        if request.id in self._inflight:
            self._spawn(
                self._dead_letter(
                    record,
                    ErrorCode.DUPLICATE_ID,
                    f"request id {request.id!r} is already in flight from another record",
                )
            )
            return
        if request.id in self.control.cancels:
            self._spawn(self._terminal_only(record, request, priority, EventType.CANCELLED))
            return
        if request.deadline_ms is not None and request.deadline_ms <= protocol.now_ms():
            self._spawn(self._terminal_only(record, request, priority, EventType.EXPIRED))
            return
        if self.config.log_prompts:  # debugging only: prompts are never logged otherwise
            self.log.debug(
                "request_received",
                request_id=request.id,
                prompt=request.prompt,
                messages=request.messages,
            )
        began = time.perf_counter()
        prepared = self._prepare(request)
        tokenize_s = time.perf_counter() - began
        if isinstance(prepared, Rejection):
            self._spawn(self._reject(record, priority, prepared))
            return
        prompt_ids, params = prepared
        stream = self.engine.add(
            request.id, prompt_ids, params, priority=lane, deadline_ms=request.deadline_ms
        )
        flight = InFlight(request, record, priority, stream, len(prompt_ids), tokenize_s)
        self._inflight[request.id] = flight
        self._by_record[key] = request.id
        flight.task = self._spawn(self._serve(flight))

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams] | Rejection:
        """Tokenize and apply the token limits (DECISIONS: never clamp a value the user gave)."""
        engine, cfg = self.engine, self.config.engine
        tokenizer = engine.tokenizer
        if request.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                return Rejection(
                    request.id,
                    ErrorCode.NO_CHAT_TEMPLATE,
                    "this model has no chat template; send `prompt` instead",
                )
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            prompt_ids = tokenizer(request.prompt).input_ids
        n, context = len(prompt_ids), engine.max_model_len
        max_prompt = cfg.max_prompt_tokens or context - 1
        if n == 0:
            return Rejection(request.id, ErrorCode.INVALID_FIELD, "the prompt has no tokens")
        if n > max_prompt:
            return Rejection(
                request.id,
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt is {n} tokens; the limit is {max_prompt} (max_prompt_tokens)",
            )
        cap = cfg.max_tokens_cap or context
        if request.max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, context - n)
        elif request.max_tokens > cap:
            return Rejection(
                request.id,
                ErrorCode.MAX_TOKENS_TOO_LARGE,
                f"max_tokens={request.max_tokens} is above the cap {cap} (max_tokens_cap)",
            )
        elif n + request.max_tokens > context:
            return Rejection(
                request.id,
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"prompt ({n} tokens) + max_tokens ({request.max_tokens}) = "
                f"{n + request.max_tokens} exceeds the context length {context}",
            )
        else:
            max_tokens = request.max_tokens
        params = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            max_tokens=max_tokens,
            stop=tuple(request.stop),
            ignore_eos=request.ignore_eos,
        )
        return prompt_ids, params

    def _apply_backpressure(self) -> None:
        """Pause a lane's partitions while its waiting queue is full; resume when it drains."""
        if self.consumer is None or self.engine.scheduler is None:
            return
        # Outputs the broker has not acknowledged yet: past the limit every lane pauses, so a
        # broker that stops taking outputs cannot grow the worker's memory (nothing is dropped).
        outstanding = self.publisher.outstanding
        limit = self.config.max_outstanding_outputs
        if outstanding >= limit and not self._outputs_blocked:
            self._outputs_blocked = True
            self.output_pauses += 1
            self.log.warning("intake_paused_for_outputs", outstanding=outstanding, limit=limit)
        elif self._outputs_blocked and outstanding < limit // 2:
            self._outputs_blocked = False
            self.log.info("intake_resumed_for_outputs", outstanding=outstanding)
        for topic, (lane, _) in self.lanes.items():
            full = self._outputs_blocked or (
                self.engine.scheduler.num_waiting_in(lane) >= self.config.lane_capacity
            )
            tps = [tp for tp in self.consumer.assignment() if tp.topic == topic]
            if full and topic not in self._paused:
                self._paused.add(topic)
                self.consumer.pause(*tps)
                self.log.info("lane_paused", topic=topic, waiting=self.config.lane_capacity)
            elif not full and topic in self._paused:
                self._paused.discard(topic)
                self.consumer.resume(*tps)
                self.log.info("lane_resumed", topic=topic)

    def _reapply_pauses(self) -> None:
        # aiokafka forgets pauses on rebalance.
        if self.consumer is None:
            return
        tps = [tp for tp in self.consumer.assignment() if tp.topic in self._paused]
        if tps:
            self.consumer.pause(*tps)

    # ------------------------------------------------------------------ outcomes

    async def _serve(self, flight: InFlight) -> None:
        request, publisher = flight.request, self.publisher
        bound = self.log.bind(
            request_id=request.id, attempt=flight.attempt, priority=flight.priority
        )
        produced_at = flight.record.timestamp / 1000
        chunk_acks: list[asyncio.Future[Any]] = []
        started_wall = first_token_wall = None
        await publisher.send_event(
            publisher.event(request.id, EventType.QUEUED, priority=flight.priority),
            traceparent=flight.traceparent,
        )
        async for out in flight.stream:
            if out.kind is OutputKind.STARTED:
                started_wall = time.time()
                await self._announce(flight, EventType.STARTED)
                self.metrics.request_queue_time.labels(flight.priority).observe(
                    max(0.0, started_wall - produced_at)
                )
            elif out.kind is OutputKind.TOKENS:
                if first_token_wall is None and out.token_ids:
                    first_token_wall = time.time()
                chunk = protocol.TokenChunk(
                    request_id=request.id,
                    attempt=flight.attempt,
                    index=out.index,
                    token_ids=out.token_ids,
                    text=out.text,
                )
                chunk_acks.append(
                    await publisher.send_chunk(
                        chunk, priority=flight.priority, traceparent=flight.traceparent
                    )
                )
                self.metrics.generation_tokens.inc(len(out.token_ids))
            elif out.kind is OutputKind.PREEMPTED:
                self.metrics.num_preemptions.inc()
                await self._announce(flight, EventType.PREEMPTED)
            elif out.kind is OutputKind.FINISHED:
                await self._finish(flight, out, chunk_acks, started_wall, first_token_wall, bound)

    async def _announce(self, flight: InFlight, event_type: EventType) -> None:
        """A non-terminal event of the flight's attempt (not awaited: only outcomes are)."""
        event = self.publisher.event(
            flight.request.id, event_type, attempt=flight.attempt, priority=flight.priority
        )
        await self.publisher.send_event(event, traceparent=flight.traceparent)

    async def _finish(
        self,
        flight: InFlight,
        out: RequestOutput,
        chunk_acks: list[asyncio.Future[Any]],
        started_wall: float | None,
        first_token_wall: float | None,
        bound: Any,
    ) -> None:
        request, publisher = flight.request, self.publisher
        try:
            if out.finish_reason == "revoked":
                bound.info("request_handed_back")  # no outcome: its offset stays uncommitted
                return
            publish_began = time.time()
            await asyncio.gather(*chunk_acks)  # every chunk is acknowledged before the outcome
            event_type = TERMINAL_BY_REASON.get(out.finish_reason or "failed", EventType.FAILED)
            now = time.time()
            produced_at = flight.record.timestamp / 1000
            fields: dict[str, Any] = {
                "attempt": flight.attempt,
                "priority": flight.priority,
                "metadata": request.metadata,
            }
            if event_type is EventType.COMPLETED:
                fields.update(
                    text=out.final_text or "",
                    finish_reason=protocol.FinishReason(out.finish_reason),
                    usage=protocol.Usage(
                        prompt_tokens=out.num_prompt_tokens,
                        completion_tokens=out.num_completion_tokens,
                    ),
                    timings=protocol.Timings(
                        queue_ms=round(((started_wall or now) - produced_at) * 1000, 3),
                        ttft_ms=round((first_token_wall - produced_at) * 1000, 3)
                        if first_token_wall
                        else None,
                        e2e_ms=round((now - produced_at) * 1000, 3),
                    ),
                )
            elif event_type is EventType.FAILED:
                fields["error"] = protocol.ErrorInfo(
                    code=ErrorCode.MODEL_ERROR, message=out.error or "generation failed"
                )
                self.metrics.errors.labels(kind="model").inc()
            ack = await publisher.send_event(
                publisher.event(request.id, event_type, **fields), traceparent=flight.traceparent
            )
            await ack
            self.offsets.finish(*flight.key)
            self._remember_finished(flight.key)
            self._observe(flight, out, event_type, now, produced_at, first_token_wall)
            done = time.time()
            ms = lambda a, b: round(max(0.0, b - a) * 1000, 1) if a and b else None  # noqa: E731
            # One summary line per request: where its time went.
            bound.info(
                "request_finished",
                outcome=str(event_type),
                reason=out.finish_reason,
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_completion_tokens,
                queue_ms=ms(produced_at, started_wall),
                tokenize_ms=round(flight.tokenize_s * 1000, 2),
                prefill_ms=ms(started_wall, first_token_wall),
                decode_ms=ms(first_token_wall, publish_began),
                publish_ms=ms(publish_began, done),
                e2e_ms=ms(produced_at, done),
            )
        finally:
            self._inflight.pop(request.id, None)
            self._by_record.pop(flight.key, None)

    def _observe(
        self,
        flight: InFlight,
        out: RequestOutput,
        event_type: EventType,
        now: float,
        produced_at: float,
        first_token_wall: float | None,
    ) -> None:
        m, p = self.metrics, flight.priority
        m.requests.labels(priority=p, outcome=str(event_type)).inc()
        m.prompt_tokens.inc(out.num_prompt_tokens)
        m.e2e_request_latency.labels(p).observe(max(0.0, now - produced_at))
        if first_token_wall is not None:
            m.time_to_first_token.labels(p).observe(max(0.0, first_token_wall - produced_at))
            if out.num_completion_tokens > 1:
                m.time_per_output_token.labels(p).observe(
                    (now - first_token_wall) / (out.num_completion_tokens - 1)
                )

    async def _terminal_only(
        self,
        record: ConsumerRecord[Any, Any],
        request: GenerationRequest,
        priority: str,
        event_type: EventType,
    ) -> None:
        """An outcome without generating (cancelled before it arrived, deadline already passed)."""
        event = self.publisher.event(
            request.id, event_type, priority=priority, metadata=request.metadata
        )
        await (await self.publisher.send_event(event))
        self._finished_record(record, priority, str(event_type))

    async def _reject(
        self, record: ConsumerRecord[Any, Any], priority: str, rejection: Rejection
    ) -> None:
        event = self.publisher.event(
            rejection.request_id,
            EventType.REJECTED,
            priority=priority,
            error=protocol.ErrorInfo(code=rejection.code, message=rejection.message),
        )
        await (await self.publisher.send_event(event))
        self.log.info(
            "request_rejected",
            request_id=rejection.request_id,
            code=str(rejection.code),
            reason=rejection.message,
        )
        self._finished_record(record, priority, "rejected")

    async def _dead_letter(
        self, record: ConsumerRecord[Any, Any], code: ErrorCode, message: str
    ) -> None:
        ack = await self.publisher.send_dead_letter(
            value=record.value,
            key=record.key,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(code),
            message=message,
            headers=record.headers or (),
        )
        await ack
        self.log.warning(
            "dead_letter",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(code),
            reason=message,
        )
        self.metrics.errors.labels(kind=str(code)).inc()
        self._finished_record(record, self.lanes[record.topic][1], "dlq")

    def _finished_record(
        self, record: ConsumerRecord[Any, Any], priority: str, outcome: str
    ) -> None:
        key = (record.topic, record.partition, record.offset)
        self.offsets.finish(*key)
        self._remember_finished(key)
        self.metrics.requests.labels(priority=priority, outcome=outcome).inc()

    def _remember_finished(self, key: RecordKey) -> None:
        self._recently_finished[key] = None
        while len(self._recently_finished) > RECENTLY_FINISHED:
            self._recently_finished.popitem(last=False)

    # ------------------------------------------------------------------ control and commits

    def _on_cancel(self, request_id: str) -> None:
        if self.engine.abort(request_id, "cancelled"):
            self.log.info("request_cancelled", request_id=request_id)

    async def _health_loop(self) -> None:
        """Broker reachability, the stall watchdog, lag and device gauges, once a second."""
        outage_since: float | None = None
        last_outage_log = 0.0
        while True:
            await asyncio.sleep(1.0)
            ok = await self.publisher.probe(timeout=3.0)
            now = time.monotonic()
            if ok and outage_since is not None:
                self.log.warning("broker_reachable_again", outage_s=round(now - outage_since, 1))
                outage_since = None
            elif not ok:
                if outage_since is None:
                    outage_since = now
                # Once per 30 s, not once per message or reconnect attempt.
                if now - last_outage_log > 30:
                    last_outage_log = now
                    self.log.error("broker_unreachable", outage_s=round(now - outage_since, 1))
            self._broker_ok = ok
            self._check_stall(now)
            ready, _ = self._ready()
            self.metrics.set_ready(ready)
            self._refresh_lag()
            self.metrics.refresh_device_stats(self.config.engine.devices)

    def _check_stall(self, now: float) -> None:
        scheduler = self.engine.scheduler
        idle_for = now - self.engine.last_step_at
        stalled = bool(scheduler and scheduler.has_work and idle_for > self.config.stall_timeout_s)
        if stalled and self._stall is None:
            self._stall = f"no engine step for {idle_for:.0f}s with work queued"
            self.log.error(
                "engine_stalled",
                idle_s=round(idle_for, 1),
                running=scheduler.num_running if scheduler else 0,
                waiting=scheduler.num_waiting if scheduler else 0,
                stages=self.engine.stage_activity(),
            )
            self.metrics.errors.labels(kind="stall").inc()
        elif not stalled and self._stall is not None:
            self.log.warning("engine_stall_cleared")
            self._stall = None

    def _refresh_lag(self) -> None:
        """Lag per partition: records past the first unfinished one (what a commit would leave)."""
        if self.consumer is None:
            return
        subscription = self.consumer._subscription.subscription
        if subscription is None or subscription.assignment is None:
            return  # mid-rebalance
        positions = subscription.assignment.all_consumed_offsets()
        for tp, position in positions.items():
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            lag = end - position.offset + self.offsets.pending(tp.topic, tp.partition)
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed commit is retried next round
                self.log.warning("commit_failed", error=repr(exc))

    async def _commit(self) -> None:
        if self.consumer is None:
            return
        positions = self.offsets.committable()
        if not positions:
            return
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        positions = {tp: off for tp, off in positions.items() if tp in assigned}
        if not positions:
            return
        await self.consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(off, "") for (t, p), off in positions.items()}
        )
        self.offsets.mark_committed(positions)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop requests from revoked partitions before the revoke completes (no more tokens)."""
        keys = {(tp.topic, tp.partition) for tp in revoked}
        with contextlib.suppress(Exception):
            await self._commit()
        victims = [
            f for f in self._inflight.values() if (f.record.topic, f.record.partition) in keys
        ]
        for flight in victims:
            self.engine.abort(flight.request.id, "revoked")
        tasks = [f.task for f in victims if f.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for topic, partition in keys:
            self.offsets.forget(topic, partition)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, str(partition))
        self._assigned = False

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._reapply_pauses()
        self._assigned = True
        self.metrics.set_ready(True)
        self.log.info("partitions_assigned", count=len(assigned))

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", error=repr(task.exception()))
            self.metrics.errors.labels(kind="internal").inc()

    def _on_step(self, plan: Any, seconds: float) -> None:
        self.metrics.batch_size.observe(len(plan.items))
        busy = self.engine.stage_busy_seconds()
        for i, total in enumerate(busy):
            delta = total - self._busy_reported[i]
            if delta > 0:
                self.metrics.stage_busy_seconds.labels(stage=str(i)).inc(delta)
                self._busy_reported[i] = total

    def _refresh_gauges(self) -> None:
        scheduler = self.engine.scheduler
        if scheduler is None:
            return
        self.metrics.num_requests_running.set(scheduler.num_running)
        for lane, priority in enumerate(protocol.PRIORITIES):
            self.metrics.num_requests_waiting.labels(priority).set(scheduler.num_waiting_in(lane))
        self.metrics.kv_cache_usage.set(self.engine.kv_usage)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.on_assigned(assigned)
