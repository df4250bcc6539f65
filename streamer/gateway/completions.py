"""`POST /v1/chat/completions` and `POST /v1/completions`, streamed or not.

One HTTP request is one Kafka request: checked (model, lane backlog), produced on its lane with
a deadline, then answered from its handle on the shared reader. A streamed answer waits for the
first token or the outcome before it sends headers, so a rejected request still gets its HTTP
status (400 with the worker's code and message). The HTTP client leaving, or the deadline
passing, abandons the request: the gateway stops following it and publishes a cancel.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from streamer import protocol
from streamer.aio import cancel_and_wait
from streamer.client import RequestHandle, Update, UpdateKind
from streamer.config import GatewayConfig
from streamer.gateway import openai_format as fmt
from streamer.gateway.fleet import FleetView
from streamer.gateway.metrics import GatewayMetrics
from streamer.gateway.streams import Streams

PRIORITY_HEADER = "x-streamer-priority"
TIMEOUT_HEADER = "x-streamer-timeout"
GRACE_S = 5.0
"""How long past the deadline the gateway waits for the worker's own `expired` event."""


class Completions:
    def __init__(self, config: GatewayConfig, streams: Streams, fleet: FleetView,
                 metrics: GatewayMetrics) -> None:
        self.config = config
        self.streams = streams
        self.fleet = fleet
        self.metrics = metrics

    async def handle(self, request: Request, kind: fmt.Kind) -> Response:
        began = time.monotonic()
        try:
            body = await _json(request)
            parsed = fmt.parse_request(kind, body)
            header = request.headers.get(PRIORITY_HEADER)
            priority = (fmt.check_priority(header, PRIORITY_HEADER) if header
                        else parsed.priority or self.config.default_priority)
            self.fleet.check_model(parsed.model)
            self.fleet.check_lane(priority)
            timeout = self._timeout(request)
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
            fields = {**parsed.fields, "deadline_ms": protocol.now_ms() + int(timeout * 1000)}
            handle = await self.streams.submit(rid, priority, fields)
        except fmt.ApiError as error:
            return error_response(error, self.metrics)
        self.metrics.open_streams.inc()
        if parsed.stream:
            return await self._stream(request, parsed, handle, began, began + timeout + GRACE_S)
        try:
            return await self._complete(request, parsed, handle, began + timeout + GRACE_S)
        finally:
            self.metrics.open_streams.dec()

    def _timeout(self, request: Request) -> float:
        limit = self.config.request_timeout_s
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return limit
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise fmt.invalid(f"{TIMEOUT_HEADER}={raw!r}: seconds, a positive number",
                              TIMEOUT_HEADER)
        return min(value, limit)

    async def _complete(self, request: Request, parsed: fmt.ParsedRequest,
                        handle: RequestHandle, deadline: float) -> Response:
        rid = handle.request_id
        result = asyncio.ensure_future(handle.result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=deadline - time.monotonic(),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*(t for t in (result, gone) if not t.done()))
        if result in done and result.exception() is not None:
            return error_response(_lost(), self.metrics)
        if result not in done:
            self.streams.abandon(rid)
            if gone in done:
                self.metrics.cancels.inc()
                return Response(status_code=499)  # nobody is there to read it
            return error_response(_deadline(), self.metrics)
        outcome = result.result()
        if outcome.outcome.type is not protocol.EventType.COMPLETED:
            return error_response(fmt.outcome_error(outcome.outcome), self.metrics)
        body = fmt.completion_body(parsed.kind, rid, parsed.model, int(time.time()),
                                   outcome.text, outcome.outcome)
        return JSONResponse(body, headers={"x-request-id": rid})

    async def _stream(self, request: Request, parsed: fmt.ParsedRequest, handle: RequestHandle,
                      began: float, deadline: float) -> Response:
        rid = handle.request_id
        updates = handle.updates()
        held: list[Update] = []

        async def until_first() -> None:
            async for update in updates:
                held.append(update)
                if (update.kind is UpdateKind.TEXT and update.text) or (
                        update.event is not None and update.event.type.is_terminal):
                    return

        first = asyncio.ensure_future(until_first())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({first, gone}, timeout=deadline - time.monotonic(),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(gone)
        if first in done and first.exception() is not None:
            self.metrics.open_streams.dec()
            return error_response(_lost(), self.metrics)
        if first not in done:
            await cancel_and_wait(first)
            self.streams.abandon(rid)
            self.metrics.open_streams.dec()
            if gone in done:
                self.metrics.cancels.inc()
                return Response(status_code=499)
            return error_response(_deadline(), self.metrics)
        outcome = next((u.event for u in held if u.event and u.event.type.is_terminal), None)
        if outcome is not None and outcome.type is not protocol.EventType.COMPLETED:
            self.metrics.open_streams.dec()
            return error_response(fmt.outcome_error(outcome), self.metrics)
        if any(u.kind is UpdateKind.TEXT and u.text for u in held):
            self.metrics.ttft.labels(endpoint=parsed.kind).observe(time.monotonic() - began)
        return StreamingResponse(
            self._events(parsed, rid, updates, held, began, deadline),
            media_type="text/event-stream",
            headers={"x-request-id": rid, "cache-control": "no-cache"},
        )

    async def _events(self, parsed: fmt.ParsedRequest, rid: str, updates: AsyncIterator[Update],
                      held: list[Update], began: float, deadline: float) -> AsyncIterator[bytes]:
        """The SSE body. Its `finally` runs when the HTTP client disconnects too (the task
        streaming to it is cancelled): an unfinished request is then cancelled on the fleet."""
        kind, model, created = parsed.kind, parsed.model, int(time.time())
        usage_nulls = parsed.include_usage

        def chunk(**kw: Any) -> bytes:
            return fmt.sse(fmt.chunk_body(kind, rid, model, created, include_usage=usage_nulls,
                                          **kw))

        text = fmt.StreamText()
        outcome: protocol.Event | None = None
        finished = False
        try:
            if kind == "chat":
                yield chunk(text="", first=True)
            pending = list(held)
            while True:
                if pending:
                    update = pending.pop(0)
                else:
                    try:
                        # No task per update (wait_for makes one); in the loop's own clock.
                        loop = asyncio.get_running_loop()
                        async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                            update = await anext(updates)
                    except StopAsyncIteration:
                        break
                if update.kind is UpdateKind.RESTART:
                    text.restart()
                elif update.kind is UpdateKind.TEXT:
                    delta = text.add(update.text)
                    if delta:
                        yield chunk(text=delta)
                elif update.event is not None and update.event.type.is_terminal:
                    outcome = update.event
            finished = True
            if outcome is None or outcome.type is not protocol.EventType.COMPLETED:
                error = fmt.outcome_error(outcome) if outcome else _lost()
                self.metrics.errors.labels(code=str(error.code)).inc()
                yield fmt.sse(error.body())
            else:
                yield chunk(reason=fmt.finish_reason(outcome.finish_reason))
                if parsed.include_usage:
                    yield fmt.sse(fmt.usage_chunk(kind, rid, model, created, outcome))
            yield fmt.DONE
        except (TimeoutError, fmt.Diverged) as exc:
            error = _deadline() if isinstance(exc, TimeoutError) else fmt.ApiError(
                500, str(exc), code="attempt_diverged")
            self.metrics.errors.labels(code=str(error.code)).inc()
            yield fmt.sse(error.body())
            yield fmt.DONE
        finally:
            if not finished:  # the client left (or the deadline passed) before the outcome
                self.streams.abandon(rid)
                self.metrics.cancels.inc()
            self.metrics.open_streams.dec()
            self.metrics.duration.labels(endpoint=kind).observe(time.monotonic() - began)


def _lost() -> fmt.ApiError:
    return fmt.ApiError(500, "the gateway lost the request's stream (its Kafka reader failed)",
                        code="stream_lost")


def _deadline() -> fmt.ApiError:
    return fmt.ApiError(504, "the request's deadline passed before it finished",
                        code="deadline_exceeded")


def error_response(error: fmt.ApiError, metrics: GatewayMetrics) -> Response:
    metrics.errors.labels(code=str(error.code)).inc()
    return JSONResponse(error.body(), status_code=error.status)


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError:
        raise fmt.invalid("the request body is not valid JSON") from None


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
