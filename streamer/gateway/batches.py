"""The Batch API's engine: JSONL lines become requests on a lane, outcomes become output lines.

Durability (nothing is lost when the gateway is killed and restarted):
  1. A batch is stored with all its lines *and* the end offsets of the `<prefix>.events`
     partitions its request ids hash to, read before any line is produced. Every outcome of
     every line is therefore at or after those offsets.
  2. Lines are produced (request id `<batch id>-<line>`) and marked `submitted`.
  3. Outcomes are read from the stored offsets; the first terminal event of an id is recorded
     with its output line, in the same transaction for all records of one fetch.
  4. When no line is open, the output and error files are written and the batch is completed.
On start, each unfinished batch resumes: its events are read again from its stored offsets
(outcomes that arrived while the gateway was down are found there; lines already recorded are
skipped) and lines still `pending` are produced. A line produced but not yet marked when the
gateway died is produced again: the worker dead-letters the copy while the original is in
flight (`duplicate_id`), or serves it again after, and only the first outcome counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.client import grow_assignment
from streamer.config import KafkaSettings
from streamer.gateway import openai_format as fmt
from streamer.gateway.batch_store import BatchStore
from streamer.gateway.metrics import GatewayMetrics
from streamer.partitioning import partition_for
from streamer.protocol import EventType, GenerationRequest

log = structlog.get_logger(__name__)

ENDPOINTS: dict[str, fmt.Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
PRODUCE_CHUNK = 500
RETRY_S = 1.0  # after a Kafka error (the broker is away), try again this soon
TRANSIENT = (KafkaError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Line:
    """One input line, checked: a payload to produce, or the error that ends it at once."""

    custom_id: str
    model: str
    payload: bytes | None
    error: fmt.ApiError | None = None


def window_seconds(window: Any) -> int:
    match = re.fullmatch(r"(\d+)h", str(window))
    if not match or int(match.group(1)) < 1:
        raise fmt.invalid(f"completion_window={window!r}; expected hours such as 24h",
                          "completion_window")
    return int(match.group(1)) * 3600


def parse_lines(content: bytes, endpoint: str, deadline_ms: int, batch_id: str) -> list[Line]:
    """Every line of the input JSONL. A file that is not JSONL at all is a 400; a line that is
    JSON but not a valid request becomes a failed line."""
    kind = ENDPOINTS[endpoint]
    lines: list[Line] = []
    seen: set[str] = set()
    for n, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            raise fmt.invalid(f"line {n} of the input file is not JSON") from None
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
            raise fmt.invalid(f"line {n}: every line needs a unique string custom_id")
        seen.add(custom_id)
        body = item.get("body")
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        try:
            if item.get("url") != endpoint:
                raise fmt.invalid(f"url={item.get('url')!r}; this batch's endpoint is {endpoint}")
            parsed = fmt.parse_request(kind, body)
            request = msgspec.convert({"id": f"{batch_id}-{len(lines)}", **parsed.fields,
                                       "deadline_ms": deadline_ms}, GenerationRequest)
        except fmt.ApiError as exc:
            lines.append(Line(custom_id, model, None, exc))
            continue
        except msgspec.ValidationError as exc:
            lines.append(Line(custom_id, model, None, fmt.invalid(str(exc), code="invalid_field")))
            continue
        lines.append(Line(custom_id, parsed.model, protocol.encode(request)))
    if not lines:
        raise fmt.invalid("the input file holds no request lines")
    return lines


def output_line(custom_id: str, rid: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": rid, "body": body}, "error": None}


def error_line(custom_id: str, error: fmt.ApiError) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": error.code, "message": error.message}}


class BatchRunner:
    def __init__(self, kafka: KafkaSettings, prefix: str, store: BatchStore,
                 metrics: GatewayMetrics) -> None:
        self.kafka = kafka
        self.prefix = prefix
        self.store = store
        self.metrics = metrics
        self.events_topic = protocol.events_topic(prefix)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions = 0
        self._open: dict[str, tuple[str, str, str]] = {}  # request id -> batch, custom id, model
        self._remaining: dict[str, int] = {}  # batch id -> its lines in _open
        self._kinds: dict[str, fmt.Kind] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**self.kafka.client_kwargs(), enable_idempotence=False,
                                          linger_ms=5, max_request_size=2_000_000)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(**self.kafka.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, fetch_max_wait_ms=100)
        await self._consumer.start()
        await self._consumer.topics()
        partitions = self._consumer.partitions_for_topic(self.events_topic)
        if not partitions:
            raise RuntimeError(f"topic {self.events_topic} does not exist: run "
                               "`streamer topics apply`")
        self._partitions = len(partitions)
        for batch_id, status, priority, offsets in self.store.active():
            self._spawn(self._resume(batch_id, status, priority, offsets))
        self._spawn(self._read())

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        await cancel_and_wait(*tasks)
        for part in (self._consumer, self._producer):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        self._consumer = self._producer = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway_batch_task_failed", error=repr(task.exception())[:300])

    # ------------------------------------------------------------------ batches

    async def create(self, body: dict[str, Any], priority: str, lines: list[Line]) -> None:
        """Store the batch (step 1) and start producing its lines (step 2)."""
        batch_id = body["id"]
        kind = ENDPOINTS[body["endpoint"]]
        rows, wanted = [], {}
        for idx, line in enumerate(lines):
            rid = f"{batch_id}-{idx}"
            if line.error is not None:
                rows.append((idx, line.custom_id, rid, line.model, None, "done", 0,
                             json.dumps(error_line(line.custom_id, line.error))))
            else:
                rows.append((idx, line.custom_id, rid, line.model, line.payload, "pending",
                             None, None))
                wanted[rid] = (batch_id, line.custom_id, line.model)
        offsets = await self._end_offsets(list(wanted))
        await asyncio.to_thread(self.store.create_batch, body, priority, kind, offsets, rows)
        log.info("gateway_batch_created", batch=batch_id, lines=len(lines), priority=priority)
        self._spawn(self._resume(batch_id, body["status"], priority, offsets))

    async def cancel(self, body: dict[str, Any]) -> None:
        body.update(status="cancelling", cancelling_at=int(time.time()))
        self.store.update_batch(body)
        assert self._producer is not None
        topic = protocol.control_topic(self.prefix)
        open_lines = self.store.open_lines(body["id"])
        for rid, *_ in open_lines:
            message = protocol.ControlMessage(type="cancel", request_id=rid)
            await self._producer.send(topic, protocol.encode(message), key=rid.encode())
        await self._producer.flush()
        if not open_lines:
            await self._finalize(body["id"])

    async def _resume(self, batch_id: str, status: str, priority: str,
                      offsets: dict[int, int]) -> None:
        self._kinds[batch_id] = ENDPOINTS["/v1/completions" if self.store.kind(batch_id)
                                          == "completion" else "/v1/chat/completions"]
        lines = self.store.open_lines(batch_id)
        if status == "validating":
            body = self.store.batch(batch_id) or {}
            body.update(status="in_progress", in_progress_at=int(time.time()))
            self.store.update_batch(body)
        async with self._lock:
            for rid, custom_id, _, model, _ in lines:
                if rid not in self._open:
                    self._remaining[batch_id] = self._remaining.get(batch_id, 0) + 1
                self._open[rid] = (batch_id, custom_id, model)
            assert self._consumer is not None
            await grow_assignment(self._consumer, {
                TopicPartition(self.events_topic, p): o for p, o in offsets.items()})
        if not lines:
            await self._finalize(batch_id)
            return
        pending = [(rid, payload) for rid, _, state, _, payload in lines if state == "pending"]
        if status == "cancelling":
            return  # cancels are out; what was never produced ends as cancelled in _finalize
        await self._produce(priority, pending)

    async def _produce(self, priority: str, pending: list[tuple[str, bytes | None]]) -> None:
        assert self._producer is not None
        topic = protocol.request_topic(self.prefix, priority)
        headers = [("content-type", b"application/json"),
                   (protocol.PROTOCOL_HEADER, str(protocol.PROTOCOL_VERSION).encode())]
        for chunk in _chunks(pending, PRODUCE_CHUNK):
            while True:  # a chunk produced twice is harmless (see the module docstring)
                try:
                    acks = [await self._producer.send(topic, payload, key=rid.encode(),
                                                      headers=headers) for rid, payload in chunk]
                    await asyncio.gather(*acks)
                    break
                except TRANSIENT as exc:
                    log.warning("gateway_batch_produce_retrying", error=repr(exc)[:200])
                    await asyncio.sleep(RETRY_S)
            await asyncio.to_thread(self.store.mark_submitted, [rid for rid, _ in chunk])

    async def _end_offsets(self, request_ids: list[str]) -> dict[int, int]:
        assert self._consumer is not None
        needed = sorted({partition_for(rid.encode(), self._partitions) for rid in request_ids})
        ends = await self._consumer.end_offsets(
            [TopicPartition(self.events_topic, p) for p in needed])
        return {tp.partition: offset for tp, offset in ends.items()}

    # ------------------------------------------------------------------ outcomes

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            if not consumer.assignment():
                await asyncio.sleep(0.1)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except TRANSIENT as exc:
                log.debug("gateway_batch_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(RETRY_S)
                continue
            results: list[tuple[str, bool, dict[str, Any]]] = []
            touched: set[str] = set()
            for records in batches.values():
                for record in records:
                    found = self._outcome(record.key, record.value)
                    if found is not None:
                        results.append(found[1:])
                        touched.add(found[0])
            if results:
                await asyncio.to_thread(self.store.record, results)
                for _, ok, _ in results:
                    self.metrics.batch_lines.labels(outcome="ok" if ok else "failed").inc()
            for batch_id in touched:
                if not self._remaining.get(batch_id):
                    await self._finalize(batch_id)

    def _outcome(self, key: bytes | None, value: bytes | None
                 ) -> tuple[str, str, bool, dict[str, Any]] | None:
        rid = (key or b"").decode("utf-8", "replace")
        if rid not in self._open or value is None:
            return None
        try:
            event = protocol.decode_event(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not event.type.is_terminal:
            return None
        batch_id, custom_id, model = self._open.pop(rid)  # the first terminal event is it
        self._remaining[batch_id] -= 1
        kind = self._kinds.get(batch_id, "chat")
        if event.type is EventType.COMPLETED:
            body = fmt.completion_body(kind, rid, model, event.ts // 1000, event.text or "",
                                       event)
            return batch_id, rid, True, output_line(custom_id, rid, 200, body)
        error = fmt.outcome_error(event)
        return batch_id, rid, False, output_line(custom_id, rid, error.status, error.body())

    async def _finalize(self, batch_id: str) -> None:
        """Step 4: write the output and error files, then complete (or cancel) the batch."""
        body = self.store.batch(batch_id)
        if body is None or body["status"] in ("completed", "cancelled", "failed"):
            return
        cancelled = body["status"] == "cancelling"
        if cancelled:  # lines never produced (or still open) end as cancelled
            leftover = self.store.open_lines(batch_id)
            error = fmt.ApiError(499, "the batch was cancelled", code="batch_cancelled")
            self.store.record([(rid, False, error_line(cid, error))
                               for rid, cid, *_ in leftover])
            for rid, *_ in leftover:
                if self._open.pop(rid, None) is not None:
                    self._remaining[batch_id] -= 1
        now = int(time.time())
        body.update(status="finalizing", finalizing_at=body.get("finalizing_at") or now)
        self.store.update_batch(body)
        for ok, suffix, field in ((True, "output", "output_file_id"),
                                  (False, "errors", "error_file_id")):
            lines = self.store.results(batch_id, ok)
            if lines:
                content = ("\n".join(lines) + "\n").encode()
                body[field] = self.store.add_file("batch_output", f"{batch_id}_{suffix}.jsonl",
                                                  content, f"file-{batch_id}-{suffix}")["id"]
        if cancelled:
            body.update(status="cancelled", cancelled_at=now)
        else:
            body.update(status="completed", completed_at=now)
        self.store.update_batch(body)
        self._kinds.pop(batch_id, None)
        self._remaining.pop(batch_id, None)
        log.info("gateway_batch_done", batch=batch_id, status=body["status"])


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
