"""Intake: consume request records and turn each into exactly one of: a request in the engine, a
`rejected` event, an outcome decided at once (cancelled, expired) or a DLQ copy.

No record can end the worker: any exception while handling one record ends that record alone
(a DLQ copy with error `internal`), and a record the Kafka client cannot decode is dead-lettered
as a stub and skipped (see `fetch.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamer import protocol
from streamer.cache.serving import ResultCache
from streamer.commits.offsets import OffsetTracker
from streamer.config import WorkerConfig
from streamer.egress import events
from streamer.egress.outcomes import Outcomes
from streamer.engine.engine import Engine
from streamer.engine.limits import LimitError, TokenLimits
from streamer.engine.sequence import Resume
from streamer.intake.backpressure import Backpressure
from streamer.intake.control import ControlListener
from streamer.intake.fetch import Fetcher
from streamer.intake.flights import Flight, Flights
from streamer.intake.prepare import OFF_LOOP_CHARS, Prepared, prepare
from streamer.intake.progress import ProgressStore
from streamer.intake.records import RecentlyFinished, RecordId, header
from streamer.protocol import ErrorCode, EventType, GenerationRequest
from streamer.validation import DeadLetter, Rejection, parse_request, prompt_chars

log = structlog.get_logger(__name__)


class Intake:
    def __init__(
        self,
        config: WorkerConfig,
        name: str,
        engine: Engine,
        outcomes: Outcomes,
        offsets: OffsetTracker,
        control: ControlListener,
    ) -> None:
        self.config = config
        self.name = name
        self.engine = engine
        self.outcomes = outcomes
        self.offsets = offsets
        self.control = control
        self.lanes = {
            protocol.request_topic(config.prefix, p): (i, p)
            for i, p in enumerate(protocol.PRIORITIES)
        }
        self.flights = Flights()
        self.recent = RecentlyFinished()
        self.backpressure = Backpressure(config.lane_capacity, config.max_outstanding_outputs)
        self.consumer: AIOKafkaConsumer | None = None
        self.fetcher: Fetcher | None = None
        self.assigned = False
        self._revoked: set[tuple[str, int]] = set()  # revoked, not yet known to have moved
        self.poisoned = 0
        self._limits: TokenLimits | None = None
        self.before_revoke: Callable[[], Awaitable[None]] | None = None
        """Set by the worker: commit what is finished before partitions move."""
        self.on_assignment: Callable[[], None] | None = None
        self.progress: ProgressStore | None = None
        """Set by the worker when attempts resume from recorded progress."""
        self.cache: ResultCache | None = None
        """Set by the worker when the result cache is on."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.consumer is not None:
            return
        cfg = self.config
        self.consumer = AIOKafkaConsumer(
            **cfg.kafka.client_kwargs(),
            group_id=cfg.consumer_group,
            group_instance_id=cfg.group_instance_id,
            partition_assignment_strategy=assignors(cfg.assignor),
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.max_poll_records,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        # Explicit names, never a pattern that could match the DLQ or the outputs.
        self.consumer.subscribe(list(self.lanes), listener=_Rebalance(self))
        await self.consumer.start()
        self.fetcher = Fetcher(self.consumer)

    async def stop(self, timeout: float) -> None:
        """Leave the group (bounded: the broker may be gone); idempotent."""
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        try:
            await asyncio.wait_for(consumer.stop(), timeout)
        except TimeoutError:
            log.warning("consumer_stop_timed_out", timeout_s=timeout)

    async def poll(self) -> None:
        """One fetch: hand every record to `handle`, then apply backpressure."""
        assert self.consumer is not None and self.fetcher is not None
        records, poisoned = await self.fetcher.fetch(timeout_ms=100)
        for bad in poisoned:
            self.poisoned += 1
            self.outcomes.spawn(self.outcomes.dead_letter_stub(
                bad.topic, bad.partition, bad.offset, bad.error, self.lanes[bad.topic][1]
            ))
        for record in records:
            await self.handle(record)
        self.apply_backpressure()

    # ------------------------------------------------------------------ one record

    async def handle(self, record: ConsumerRecord[Any, Any]) -> None:
        rid = RecordId.of(record)
        self.offsets.track(*rid.key)
        if self.flights.by_record(rid) is not None:
            return  # a redelivered copy of a record this worker is serving: it joins that one
        if rid in self.recent:
            self.offsets.finish(*rid.key)
            return
        priority = self.lanes[record.topic][1]
        try:
            await self._admit(record, rid, priority)
        except Exception as exc:  # a bug or a fault of the worker: this record alone ends
            log.exception("record_failed", topic=record.topic, partition=record.partition,
                          offset=record.offset)
            self.outcomes.spawn(self.outcomes.dead_letter(
                record, rid, priority, ErrorCode.INTERNAL,
                f"the worker failed on this record: {exc!r}",
            ))

    async def _admit(self, record: ConsumerRecord[Any, Any], rid: RecordId, priority: str) -> None:
        out = self.outcomes
        parsed = parse_request(record.value, record.headers or (), self.config.limits)
        if isinstance(parsed, DeadLetter):
            out.spawn(out.dead_letter(record, rid, priority, parsed.code, parsed.message))
            return
        if isinstance(parsed, Rejection):
            self._reject(record, rid, priority, parsed)
            return
        request = parsed
        if request.id in self.flights:
            self._duplicate(record, rid, priority, request.id)
            return
        if request.id in self.control.cancels:
            self._decided(record, rid, priority, request, EventType.CANCELLED)
            return
        if request.deadline_ms is not None and request.deadline_ms <= protocol.now_ms():
            self._decided(record, rid, priority, request, EventType.EXPIRED)
            return
        if self.config.log_prompts:  # debugging only: prompts are never logged otherwise
            log.debug("request_received", request_id=request.id, prompt=request.prompt,
                      messages=request.messages)
        began = time.perf_counter()
        prepared = await self._prepare(request)
        tokenize_s = time.perf_counter() - began
        if isinstance(prepared, Rejection):
            self._reject(record, rid, priority, prepared)
            return
        if request.id in self.flights:  # admitted while this one was tokenized
            self._duplicate(record, rid, priority, request.id)
            return
        lane = self.lanes[record.topic][0]
        progress = await self._progress_of(request, record, len(prepared.prompt_ids))
        resume = None
        if progress is not None:
            resume = Resume(tuple(progress.token_ids), progress.text_chars, progress.seed)
        cached = None
        if self.cache is not None and progress is None:  # a resumed attempt must continue
            cached = await self.cache.lookup(request, prepared.prompt_ids, prepared.params)
            if request.id in self.flights:  # admitted while this one was looked up
                self._duplicate(record, rid, priority, request.id)
                return
        try:
            stream = cached.stream(request.id) if cached and cached.level else self.engine.add(
                request.id, prepared.prompt_ids, prepared.params, priority=lane,
                deadline_ms=request.deadline_ms, resume=resume,
            )
        except LimitError as exc:  # e.g. KV_BUDGET_EXCEEDED: it could never fit the KV cache
            self._reject(record, rid, priority, Rejection(request.id, exc.code, str(exc)))
            return
        flight = Flight(
            request, record, rid, priority, stream, len(prepared.prompt_ids),
            traceparent=protocol.valid_traceparent(header(record, "traceparent")),
            tokenize_s=tokenize_s, cache=cached,
        )
        if progress is not None and stream.resumed_at:
            flight.resumed = protocol.Resumed(
                attempt=progress.attempt, index=stream.resumed_at, segments=progress.segments
            )
            flight.resume_base = (list(progress.token_ids), progress.text_chars)
            self.outcomes.metrics.resumed_attempts.inc()
            self.outcomes.metrics.resumed_tokens.inc(stream.resumed_at)
            log.info("request_resumed", request_id=request.id, attempt=flight.attempt,
                     resumes=progress.attempt, index=stream.resumed_at, worker=progress.worker)
        self.flights.add(flight)
        flight.task = out.spawn(self._serve(flight))

    async def _progress_of(self, request: GenerationRequest, record: ConsumerRecord[Any, Any],
                           prompt_tokens: int) -> protocol.Progress | None:
        """Recorded progress of this very record, if an earlier attempt left some."""
        if self.progress is None:
            return None
        found = await self.progress.lookup(request.id, record.topic, record.partition,
                                           record.offset, self.config.progress_wait_s)
        if found is None or found.prompt_tokens != prompt_tokens:
            return None  # none, or written for another rendering of the prompt: start over
        return found

    async def _serve(self, flight: Flight) -> None:
        try:
            await self.outcomes.serve(flight, lambda: self.flights.is_current(flight))
        finally:
            # Every path: a flight that ended without an outcome is handed back (uncommitted).
            self.flights.remove(flight)
            if self.flights.by_id(flight.request.id) is None:  # no newer attempt took the id
                self.engine.abort(flight.request.id, "revoked")

    def _duplicate(self, record: ConsumerRecord[Any, Any], rid: RecordId, priority: str,
                   request_id: str) -> None:
        """A different record whose id is in flight: its outcome would pass for the original's."""
        self.outcomes.spawn(self.outcomes.dead_letter(
            record, rid, priority, ErrorCode.DUPLICATE_ID,
            f"request id {request_id!r} is already in flight from another record",
        ))

    async def _prepare(self, request: GenerationRequest) -> Prepared | Rejection:
        cfg = self.config.engine
        limits = self._limits = self._limits or TokenLimits(
            context=self.engine.max_model_len,  # known once the model is loaded
            default_max_tokens=cfg.default_max_tokens,
            max_tokens_cap=cfg.max_tokens_cap,
            max_prompt_tokens=cfg.max_prompt_tokens,
        )
        if prompt_chars(request) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(prepare, request, self.engine.tokenizer, limits)
        return prepare(request, self.engine.tokenizer, limits)

    def _reject(self, record: ConsumerRecord[Any, Any], rid: RecordId, priority: str,
                rejection: Rejection) -> None:
        log.info("request_rejected", request_id=rejection.request_id, code=str(rejection.code),
                 reason=events.truncate(rejection.message, 300))
        event = events.rejected(rejection.request_id, self.name, priority, rejection.code,
                                rejection.message)
        self.outcomes.spawn(self.outcomes.publish_terminal(rid, priority, event))

    def _decided(self, record: ConsumerRecord[Any, Any], rid: RecordId, priority: str,
                 request: GenerationRequest, event_type: EventType) -> None:
        event = events.without_generation(request.id, self.name, priority, event_type,
                                          request.metadata)
        self.outcomes.spawn(self.outcomes.publish_terminal(rid, priority, event))

    def finished(self, rid: RecordId, flight: Flight | None) -> None:
        """An outcome for the record was acknowledged: its offset may be committed."""
        if flight is not None and not self.flights.remove(flight):
            return  # handed back meanwhile: the record belongs to its next delivery now
        self.offsets.finish(*rid.key)
        self.recent.add(rid)

    # ------------------------------------------------------------------ backpressure

    def output_sent(self) -> None:
        """An output was handed to the producer: pause at once when that reaches the limit
        (between fetches the poll loop would only see it after its next fetch)."""
        bp = self.backpressure
        if not bp.outputs_blocked and \
                self.outcomes.publisher.outstanding >= bp.max_outstanding_outputs:
            self.apply_backpressure()

    def apply_backpressure(self) -> None:
        """Pause a lane's partitions while its waiting queue is full; resume when it drains."""
        scheduler = self.engine.scheduler
        if self.consumer is None or scheduler is None:
            return
        waiting = [scheduler.num_waiting_in(lane) for lane in range(len(protocol.PRIORITIES))]
        was_blocked = self.backpressure.outputs_blocked
        pause, resume = self.backpressure.decide(waiting, self.outcomes.publisher.outstanding)
        if self.backpressure.outputs_blocked != was_blocked:
            log.warning("intake_paused_for_outputs" if not was_blocked
                        else "intake_resumed_for_outputs",
                        outstanding=self.outcomes.publisher.outstanding)
        for lanes, action, event in ((pause, self.consumer.pause, "lane_paused"),
                                     (resume, self.consumer.resume, "lane_resumed")):
            if tps := self._partitions_of(lanes):
                action(*tps)
            for lane in sorted(lanes):
                log.info(event, topic=protocol.request_topic(self.config.prefix,
                                                             protocol.PRIORITIES[lane]))

    def _partitions_of(self, lanes: set[int]) -> list[TopicPartition]:
        """The assigned partitions of these lanes' request topics."""
        assert self.consumer is not None
        return [tp for tp in self.consumer.assignment() if self.lanes[tp.topic][0] in lanes]

    # ------------------------------------------------------------------ rebalances

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is finished, and keep serving: aiokafka's eager protocol revokes every
        partition at each rebalance, but with the sticky assignor most come straight back.
        Only the partitions that really moved are stopped, once the new assignment is known."""
        try:
            if self.before_revoke is not None:
                await asyncio.wait_for(self.before_revoke(), self.config.shutdown_timeout_s)
        except Exception as exc:
            log.warning("commit_on_revoke_failed", error=repr(exc)[:200])
        trails = [f.trail.checkpoint() for f in self.flights.all() if f.trail is not None]
        if trails:  # before the join: whoever gets a moved partition finds this progress
            try:
                await asyncio.wait_for(asyncio.gather(*trails, return_exceptions=True),
                                       self.config.shutdown_timeout_s)
            except TimeoutError:
                log.warning("progress_on_revoke_timed_out", requests=len(trails))
        self._revoked |= {(tp.topic, tp.partition) for tp in revoked}
        self.assigned = False

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        now = {(tp.topic, tp.partition) for tp in assigned}
        if self.progress is not None:
            self.progress.own(now)
        moved, kept = self._revoked - now, self._revoked & now
        self._revoked = set()
        if moved:
            await self._stop_moved(moved)
        # aiokafka forgets pauses on rebalance.
        if self.consumer is not None and (tps := self._partitions_of(self.backpressure.paused)):
            self.consumer.pause(*tps)
        self.assigned = True
        if self.on_assignment is not None:
            self.on_assignment()
        log.info("partitions_assigned", count=len(assigned), kept=len(kept), moved=len(moved))

    async def _stop_moved(self, keys: set[tuple[str, int]]) -> None:
        """Stop the requests of partitions another member owns now (no more tokens from them).

        Those that do not stop within `revoke_wait_s` are handed back anyway: unregistered, so
        the record is served afresh by whoever owns it, and their late end finishes nothing."""
        victims = self.flights.in_partitions(keys)
        for flight in victims:
            self.engine.abort(flight.request.id, "revoked")
        tasks = [f.task for f in victims if f.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.config.revoke_wait_s)
            if late:
                log.warning("revoke_wait_expired", handed_back=len(late))
        for flight in victims:
            self.flights.remove(flight)
        for topic, partition in keys:
            self.offsets.forget(topic, partition)
        if self.fetcher is not None:
            self.fetcher.forget({TopicPartition(t, p) for t, p in keys})
        log.info("partitions_moved", count=len(keys), stopped=len(victims))


def assignors(name: str) -> tuple[type, ...]:
    """The strategies offered to the group, preferred first. The group picks one every member
    offers, so sticky workers joining a round-robin group (a rolling upgrade) still agree."""
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    from streamer.intake.assignor import LaneStickyAssignor

    return {
        "sticky": (LaneStickyAssignor, StickyPartitionAssignor, RoundRobinPartitionAssignor),
        "aiokafka-sticky": (StickyPartitionAssignor, RoundRobinPartitionAssignor),
        "roundrobin": (RoundRobinPartitionAssignor,),
        "range": (RangePartitionAssignor,),
    }[name]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.intake.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.intake.on_assigned(assigned)
