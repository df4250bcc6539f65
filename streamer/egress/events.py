"""Terminal events as pure functions of what happened (no I/O; unit-tested).

Each builder returns the `Event` a worker publishes as a request's outcome. `fit` replaces an
event that could never be produced with a small `failed` event (code `output_too_large`), so every
request gets an outcome and its offset can be committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamer import protocol
from streamer.protocol import ErrorCode, ErrorInfo, Event, EventType, FinishReason, Timings, Usage

TERMINAL_BY_REASON = {
    "eos": EventType.COMPLETED,
    "length": EventType.COMPLETED,
    "stop": EventType.COMPLETED,
    "cancelled": EventType.CANCELLED,
    "expired": EventType.EXPIRED,
    "failed": EventType.FAILED,
}
MAX_MESSAGE_CHARS = 1000
"""Error messages echo user input (template errors, ids); they are cut to this length."""


@dataclass(frozen=True)
class Clock:
    """Wall-clock seconds of a request's milestones (None: never reached)."""

    produced: float  # the request record's Kafka timestamp
    started: float | None
    first_token: float | None
    now: float


def truncate(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def timings(clock: Clock, cache: Any = None) -> Timings:
    ms = lambda t: round((t - clock.produced) * 1000, 3)  # noqa: E731
    return Timings(
        queue_ms=ms(clock.started or clock.now),
        ttft_ms=ms(clock.first_token) if clock.first_token else None,
        e2e_ms=ms(clock.now),
        cache=cache,
    )


def outcome(
    *,
    request_id: str,
    worker: str,
    attempt: str,
    priority: str,
    finish_reason: str,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    clock: Clock,
    metadata: dict[str, Any] | None = None,
    error: str | None = None,
    cache: str | None = None,
) -> Event:
    """The terminal event of an attempt that the engine finished (any reason but `revoked`), or
    that the result cache answered (`cache`: the level, on `timings`)."""
    event_type = TERMINAL_BY_REASON.get(finish_reason, EventType.FAILED)
    fields: dict[str, Any] = {"attempt": attempt, "priority": priority, "metadata": metadata}
    if event_type is EventType.COMPLETED:
        fields.update(
            text=text,
            finish_reason=FinishReason(finish_reason),
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            timings=timings(clock, cache),
        )
    elif event_type is EventType.FAILED:
        fields["error"] = ErrorInfo(
            code=ErrorCode.MODEL_ERROR, message=truncate(error or "generation failed")
        )
    return _event(request_id, event_type, worker, **fields)


def rejected(
    request_id: str, worker: str, priority: str, code: ErrorCode, message: str
) -> Event:
    return _event(
        request_id, EventType.REJECTED, worker, priority=priority,
        error=ErrorInfo(code=code, message=truncate(message)),
    )


def without_generation(
    request_id: str, worker: str, priority: str, event_type: EventType,
    metadata: dict[str, Any] | None,
) -> Event:
    """Cancelled before it arrived, or its deadline passed before it was served."""
    return _event(request_id, event_type, worker, priority=priority, metadata=metadata)


def output_too_large(event: Event, limit: int) -> Event:
    """The small `failed` event that replaces an outcome too large to produce."""
    return _event(
        event.request_id, EventType.FAILED, event.worker, attempt=event.attempt,
        priority=event.priority,
        error=ErrorInfo(
            code=ErrorCode.OUTPUT_TOO_LARGE,
            message=f"the {event.type} event is larger than the output limit of {limit} bytes",
        ),
    )


def fit(event: Event, limit: int, headers_bytes: int = 512) -> Event:
    """`event` if it can be produced within `limit` bytes, else its `output_too_large` stand-in."""
    if len(protocol.encode(event)) + headers_bytes <= limit:
        return event
    return output_too_large(event, limit)


def _event(request_id: str, type_: EventType, worker: str, **fields: Any) -> Event:
    return Event(request_id=request_id, type=type_, worker=worker, ts=protocol.now_ms(), **fields)
