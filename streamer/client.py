"""Client: produce requests and follow their tokens and events.

The client reads `<prefix>.tokens` and `<prefix>.events` outside any consumer group, and only the
partitions its own requests' outputs land on (docs/protocol.md, "Reading your own outputs"):
workers key every output by the request id, so `partition_for(id, partition count)` names the one
partition per topic. `start()` assigns nothing; each `submit()` or `follow()` first adds the
partitions of its id that are not read yet, from their end offsets, then produces. The
assignment only grows. For each request the client follows the newest attempt (announced by a
`started` event) and drops the partial stream of a superseded one; the outcome is the first
terminal event, and the text is the token chunks of the attempt that event names.

A topic whose partition count changes (seen in the consumer's metadata, which aiokafka refreshes
every `metadata_max_age_ms`, 5 min by default, or at once with `refresh_partitions()`) moves
records keyed by an id to `partition_for(id, new count)` once a worker's producer notices. The
client then reads, for every request, the partitions under every count it has seen; a partition
that open requests now need but that was not read since they were submitted is read from the
first record at or after the oldest such submission, less `CLOCK_SKEW_MS` (outputs carry the
worker's clock). Records read twice after such a seek backwards are dropped by offset
(`ReadLog`), so a handle sees each record once.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.config import KafkaSettings
from streamer.partitioning import ReadLog, partition_for
from streamer.protocol import Event, EventType, GenerationRequest, Segment, TokenChunk

CLOCK_SKEW_MS = 60_000
"""How far a worker's clock may run behind the client's: a partition picked up late (its topic
grew) is read from this much before the oldest open request that needs it."""


class UpdateKind(enum.StrEnum):
    TEXT = "text"  # new text of the current attempt
    RESTART = "restart"  # a new attempt does not continue the text shown: discard it
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
    start: int = 0  # index of its own first token (> 0 when it resumed an earlier attempt)
    segments: list[Segment] = field(default_factory=list)  # who published [0, start)

    def ranges(self, name: str) -> list[tuple[str, int, float]]:
        """(attempt, start, end) of every index of this attempt's stream, in order."""
        return [(s.attempt, s.start, s.end) for s in self.segments] + [(name, self.start, INF)]


INF = float("inf")


class RequestHandle:
    """Follows one request. Iterate for live updates, or await `result()`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # No output of the request is older (client clock); set again just before it is produced.
        self.since_ms = protocol.now_ms()
        self._error: BaseException | None = None
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._attempts: dict[str, _Attempt] = {}
        self._current: str | None = None
        self._emitted = 0  # next token index of the current attempt's stream to emit
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
        self._emit_ready()  # the chunk may be the current attempt's, or one it continues
        self._maybe_done()

    def _on_event(self, event: Event) -> None:
        if self._outcome is not None:
            return  # later terminal events for the id are duplicates of an at-least-once retry
        if event in self.events:
            return  # the same record produced twice (a producer retry): nothing new
        self.events.append(event)
        if event.type is EventType.STARTED and event.attempt:
            attempt = self._attempts.setdefault(event.attempt, _Attempt())
            if event.resumed is not None:
                attempt.start, attempt.segments = event.resumed.index, event.resumed.segments
            self._switch(event.attempt)
        self._updates.put_nowait(Update(UpdateKind.EVENT, event=event, attempt=event.attempt))
        if event.type.is_terminal:
            self._outcome = event
            if event.attempt:
                self._switch(event.attempt)
            self._maybe_done()

    def _switch(self, name: str) -> None:
        """Follow attempt `name` from now on. The text shown so far stands when `name`'s stream
        has the same owner at every index shown (it resumed the shown attempt); else RESTART."""
        if name == self._current:
            self._emit_ready()
            return
        old, self._current = self._current, name
        new = self._attempts.setdefault(name, _Attempt())
        if old is not None and not _agree(
            self._attempts.setdefault(old, _Attempt()).ranges(old), new.ranges(name),
            self._emitted,
        ):
            self._emitted = 0
            self._updates.put_nowait(Update(UpdateKind.RESTART, attempt=name))
        self._emit_ready()

    def _chunk_at(self, index: int) -> TokenChunk | None:
        """The chunk at `index` of the current attempt's stream, if it has arrived."""
        current = self._attempts.get(self._current or "")
        if current is None:
            return None
        for name, start, end in current.ranges(self._current or ""):
            if start <= index < end:
                source = self._attempts.get(name)
                return source.chunks.get(index) if source is not None else None
        return None

    def _emit_ready(self) -> None:
        while (chunk := self._chunk_at(self._emitted)) is not None:
            self._updates.put_nowait(
                Update(UpdateKind.TEXT, text=chunk.text, attempt=chunk.attempt,
                       tokens=len(chunk.token_ids))
            )
            self._emitted += max(1, len(chunk.token_ids))

    def _fail(self, error: BaseException) -> None:
        """The client can no longer follow the request (its reader failed)."""
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def _maybe_done(self) -> None:
        outcome = self._outcome
        if outcome is None or self._done.is_set():
            return
        usage = outcome.usage if outcome.type is EventType.COMPLETED else None
        if usage is not None and self._emitted < usage.completion_tokens:
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
                if self._error is not None:
                    raise self._error
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
        """The outcome, with the text of the attempt it names (through every attempt that one
        resumed)."""
        await asyncio.wait_for(self._done.wait(), timeout)
        if self._error is not None:
            raise self._error
        outcome = self._outcome
        assert outcome is not None
        ordered, index = [], 0
        while (chunk := self._chunk_at(index)) is not None:
            ordered.append(chunk)
            index += max(1, len(chunk.token_ids))
        return Result(
            request_id=self.request_id,
            outcome=outcome,
            text="".join(c.text for c in ordered),
            attempt=outcome.attempt,
            token_ids=[t for c in ordered for t in c.token_ids],
            attempts_seen=len([e for e in self.events if e.type is EventType.STARTED]),
            events=list(self.events),
        )


async def grow_assignment(
    consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int], log: ReadLog | None = None
) -> None:
    """Add partitions to `consumer`'s manual assignment, each read from its offset in `starts`;
    every partition assigned already keeps its position (or moves back to its offset in `starts`,
    never forward, so no record is skipped).

    aiokafka's `assign()` replaces the assignment and forgets every position; a partition without
    one is reset by the fetcher to `auto_offset_reset` (the end), losing what was not read yet. So:
      1. read the position of every assigned partition (these do not suspend while positions are
         valid, so the reader cannot move on meanwhile; if one does, the older position only
         makes records be read twice, which `log` drops);
      2. assign the union;
      3. seek every partition, the kept ones back to their positions, with no await between 2
         and 3: the fetcher never sees a partition of ours without a position.
    Records fetched for the old assignment but not yet handed out are discarded by aiokafka and
    fetched again from the positions set in 3.
    """
    positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}  # 1.
    targets = {**positions}
    for tp, offset in starts.items():
        targets[tp] = min(offset, positions.get(tp, offset))
    consumer.assign(list(targets))  # 2.
    for tp, offset in targets.items():  # 3.
        consumer.seek(tp, offset)
        if log is not None:
            log.seek(tp, offset)


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
        self._tokens_topic = protocol.tokens_topic(prefix)
        self._handles: dict[str, RequestHandle] = {}
        self._reader: asyncio.Task[None] | None = None
        # Partition counts seen per output topic, the current one last.
        self._counts: dict[str, list[int]] = {}
        # Each assigned partition, with the time (client clock, ms) from which it is read.
        self._since: dict[TopicPartition, int] = {}
        self._log = ReadLog()
        self._grow_lock = asyncio.Lock()  # one change of the assignment at a time

    async def start(self) -> StreamerClient:
        """Connect and learn the output topics' partition counts; nothing is assigned yet."""
        await self._producer.start()
        await self._consumer.start()
        for topic in (self._tokens_topic, protocol.events_topic(self.prefix)):
            count = self._partition_count(topic)
            if count is None:
                await self._consumer.topics()  # refreshes metadata
                count = self._partition_count(topic)
            if count is None:
                raise RuntimeError(f"topic {topic} does not exist: run `streamer topics apply`")
            self._counts[topic] = [count]
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
        session: str | None = None,
        **fields: Any,
    ) -> RequestHandle:
        """Produce a request on `<prefix>.requests.<priority>` and return its handle.

        The partitions its outputs land on are read (from their ends) before it is produced.
        `session` keys the request record (default: its id): requests of one session land on one
        partition, so on the worker whose prefix cache holds their shared prefix. Outputs are
        keyed by the id whatever the key (docs/protocol.md, "Prefix-affine routing")."""
        if session is not None and not session:
            raise ValueError("session must be a non-empty string (or None: key by the id)")
        if priority not in protocol.PRIORITIES:
            raise ValueError(f"priority {priority!r}; expected one of {protocol.PRIORITIES}")
        request_id = request_id or uuid.uuid4().hex
        request = msgspec.convert(
            {"id": request_id, "prompt": prompt, "messages": messages, **fields}, GenerationRequest
        )
        handle = RequestHandle(request_id)
        self._handles[request_id] = handle
        await self._cover(request_id)
        handle.since_ms = protocol.now_ms()
        await self.produce_raw(
            protocol.encode(request), priority=priority, key=(session or request_id).encode(),
            headers=headers,
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
        """Produce arbitrary bytes to a request topic (tests and tools). Outputs are keyed by the
        `id` inside, whatever `key` is: `follow(id)` first to read them."""
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

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """The output partitions this client reads."""
        return frozenset(self._consumer.assignment())

    async def follow(self, request_id: str) -> RequestHandle:
        """Follow a request produced elsewhere, from now on: when this returns, the partitions
        its outputs land on are read, so produce the request after it."""
        handle = self._handles.get(request_id)
        fresh = handle is None
        if handle is None:
            handle = self._handles[request_id] = RequestHandle(request_id)
        await self._cover(request_id)
        if fresh:
            handle.since_ms = protocol.now_ms()
        return handle

    def forget(self, request_id: str) -> None:
        """Stop following a request: its later outputs are skipped (e.g. its caller left)."""
        self._handles.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        message = protocol.ControlMessage(type="cancel", request_id=request_id)
        await self._producer.send_and_wait(
            protocol.control_topic(self.prefix), protocol.encode(message), key=request_id.encode()
        )

    async def refresh_partitions(self) -> None:
        """Fetch the output topics' partition counts now and follow a change (the reader also
        notices one when aiokafka refreshes its metadata)."""
        await self._consumer.topics()
        await self._follow_counts()

    # -- the assignment
    def _partition_count(self, topic: str) -> int | None:
        partitions = self._consumer.partitions_for_topic(topic)
        return len(partitions) if partitions else None

    def _partitions_of(self, request_id: str) -> set[TopicPartition]:
        """Where the outputs of `request_id` can be: its partition under each count seen."""
        key = request_id.encode()
        return {
            TopicPartition(topic, p)
            for topic, counts in self._counts.items()
            for n in counts
            if (p := partition_for(key, n)) < counts[-1]  # a topic made anew can be smaller
        }

    async def _cover(self, request_id: str) -> None:
        """Read the partitions of `request_id` not read yet, from their ends: the request is
        not produced yet, so all its outputs come after."""
        if self._reader is not None and self._reader.done():
            self._reader.result()  # the reader failed: say why, here too
        if self._partitions_of(request_id) <= self._since.keys():
            return  # read already (positions are set before a partition enters _since)
        async with self._grow_lock:
            missing = self._partitions_of(request_id) - self._since.keys()
            if not missing:
                return
            ends = await self._consumer.end_offsets(sorted(missing))
            await grow_assignment(self._consumer, ends, self._log)
            now = protocol.now_ms()  # after the end offsets were read: every later record is read
            for tp in missing:
                self._since[tp] = now
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(), name="client-reader")

    def _counts_changed(self) -> bool:
        return any(self._partition_count(topic) not in (None, counts[-1])
                   for topic, counts in self._counts.items())

    async def _follow_counts(self) -> None:
        """A topic's partition count changed: read, for every open request, its partition under
        the new count too, from the oldest open request's start (see the module docstring)."""
        async with self._grow_lock:
            for topic, counts in self._counts.items():
                count = self._partition_count(topic)
                if count is not None and count != counts[-1]:
                    if count in counts:
                        counts.remove(count)
                    counts.append(count)
            need: dict[TopicPartition, int] = {}
            for handle in self._handles.values():
                for tp in self._partitions_of(handle.request_id):
                    need[tp] = min(need.get(tp, handle.since_ms), handle.since_ms)
            late = {tp: ms for tp, ms in need.items() if self._since.get(tp, ms + 1) > ms}
            if not late:
                return
            ends = await self._consumer.end_offsets(sorted(late))
            found = await self._consumer.offsets_for_times(
                {tp: max(0, ms - CLOCK_SKEW_MS) for tp, ms in late.items()})
            starts = {}
            for tp in late:
                at = found.get(tp)
                # None: no record that new (the embedded broker answers timestamp -1 instead).
                starts[tp] = at.offset if at is not None and at.timestamp >= 0 else ends[tp]
            await grow_assignment(self._consumer, starts, self._log)
            for tp, ms in late.items():
                self._since[tp] = min(ms, self._since.get(tp, ms))
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(), name="client-reader")

    # -- the reader
    async def _read(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        if self._log.first_time(tp, record.offset):
                            self._dispatch(record)
                if self._counts_changed():
                    await self._follow_counts()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for handle in list(self._handles.values()):
                handle._fail(exc)
            raise

    def _dispatch(self, record: Any) -> None:
        handle = self._handles.get((record.key or b"").decode("utf-8", "replace"))
        if handle is None:
            return
        try:
            if record.topic == self._tokens_topic:
                handle._on_chunk(protocol.decode_chunk(record.value))
            else:
                handle._on_event(protocol.decode_event(record.value))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not ours to judge: another producer's message on the topic
        if handle.done:  # the outcome is delivered: later messages are duplicates
            self._handles.pop(handle.request_id, None)


def _agree(old: list[tuple[str, int, float]], new: list[tuple[str, int, float]],
           upto: int) -> bool:
    """Whether two attempts' streams have the same owner at every index below `upto`."""
    def owner(ranges: list[tuple[str, int, float]], index: int) -> str | None:
        return next((name for name, start, end in ranges if start <= index < end), None)

    points = {start for _, start, _ in old + new if start < upto} | {0}
    return all(owner(old, p) == owner(new, p) for p in points if p < upto)
