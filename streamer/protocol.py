"""Wire protocol v1: every message streamer reads or writes on Kafka.

This module is the single source of truth for the protocol; docs/protocol.md describes the same
structs field by field. JSON on the wire, UTF-8, Kafka key = request id on every message.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1
PROTOCOL_HEADER = "streamer-protocol"
MAX_ID_LENGTH = 128

PRIORITIES: tuple[str, ...] = ("urgent", "high", "normal", "low")
"""Priority lanes, highest first. The request topic names the priority."""


class EventType(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PREEMPTED = "preempted"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENTS


TERMINAL_EVENTS = frozenset(
    {
        EventType.COMPLETED,
        EventType.FAILED,
        EventType.REJECTED,
        EventType.CANCELLED,
        EventType.EXPIRED,
    }
)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop string matched
    LENGTH = "length"  # max_tokens reached
    EOS = "eos"  # the model produced an end-of-sequence token


class ErrorCode(enum.StrEnum):
    """Codes on `rejected` / `failed` events and in DLQ `error` headers."""

    # DLQ: the record cannot be answered on llm.events (no usable id) or must not be.
    UNDECODABLE = "undecodable"
    INVALID_ID = "invalid_id"
    DUPLICATE_ID = "duplicate_id"
    MESSAGE_TOO_LARGE = "message_too_large"
    # rejected: the request has an id, so the client is told what to fix.
    INVALID_FIELD = "invalid_field"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NO_CHAT_TEMPLATE = "no_chat_template"
    PROMPT_TOO_LONG = "prompt_too_long"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    KV_BUDGET_EXCEEDED = "kv_budget_exceeded"
    # DLQ: the worker failed on the record itself (a bug); the record alone ends.
    INTERNAL = "internal"
    # failed: the worker could not finish it.
    MODEL_ERROR = "model_error"
    OUTPUT_TOO_LARGE = "output_too_large"


# --------------------------------------------------------------------------------------------
# Requests (llm.requests.<priority>)


class ChatMessage(Struct, frozen=True, forbid_unknown_fields=False):
    role: str
    content: str


class GenerationRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A generation request. Unknown fields are ignored (forward compatibility)."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: min(default_max_tokens, context_length - prompt_tokens); see docs/protocol.md.
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0  # 0: disabled
    # torch.Generator.manual_seed overflows past 64 bits; msgspec bounds only to int64.
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    deadline_ms: Annotated[int, Meta(ge=0)] | None = None
    metadata: dict[str, Any] | None = None
    cache: bool = True  # False: never answered from the result cache, nor stored in it


# --------------------------------------------------------------------------------------------
# Outputs (llm.tokens, llm.events)


class TokenChunk(Struct, frozen=True, kw_only=True):
    """A run of generated tokens. Concatenating `text` in `index` order gives the final text."""

    request_id: str
    attempt: str
    index: int  # index of the first token of this chunk in the completion, 0-based
    token_ids: list[int]
    text: str


class Usage(Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int


class Timings(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Milliseconds measured from the request record's Kafka timestamp (the producer's clock)."""

    queue_ms: float
    ttft_ms: float | None
    e2e_ms: float
    cache: Literal["l1", "l2", "l3"] | None = None  # set when served from the result cache


class ErrorInfo(Struct, frozen=True, kw_only=True):
    code: str
    message: str


class Segment(Struct, frozen=True, kw_only=True):
    """Completion tokens [start, end) of a request, as published by `attempt`."""

    attempt: str
    start: int
    end: int


class Resumed(Struct, frozen=True, kw_only=True):
    """On a `started` event: this attempt continues an earlier one instead of starting over.

    Its first chunk has `index` = `index`; tokens [0, index) are the chunks named by `segments`
    (in order, covering [0, index) exactly; the last one is `attempt`'s)."""

    attempt: str  # the attempt it continues
    index: int
    segments: list[Segment]


class Event(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A lifecycle event. `completed` adds text, finish_reason, usage, timings, metadata;
    `failed` / `rejected` add error; `started` of a resumed attempt adds `resumed`. Optional
    fields are omitted when not set."""

    request_id: str
    type: EventType
    attempt: str | None = None
    worker: str
    ts: int  # epoch ms
    priority: str | None = None
    text: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    metadata: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    resumed: Resumed | None = None


# --------------------------------------------------------------------------------------------
# Progress (llm.progress): written and read by workers only


class Progress(Struct, frozen=True, kw_only=True):
    """How far an attempt got: the completion tokens whose chunks the broker acknowledged.

    Keyed by request id on a compacted topic, in the partition of the request record (modulo the
    topic's partition count), and tombstoned once the request's outcome is published. A worker
    that is handed the same record (topic, partition, offset) continues from here."""

    request_id: str
    attempt: str
    worker: str
    ts: int  # epoch ms
    topic: str  # the request record's
    partition: int
    offset: int
    prompt_tokens: int
    token_ids: list[int]
    text_chars: int  # characters of text the chunks of token_ids carried
    segments: list[Segment]  # who published [0, len(token_ids)), as in `Resumed.segments`
    seed: int | None = None  # the base seed of its draws (sampled requests)


# --------------------------------------------------------------------------------------------
# Control (llm.control)


class ControlMessage(Struct, frozen=True, kw_only=True):
    type: Literal["cancel"]
    request_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]


# --------------------------------------------------------------------------------------------
# Encoding helpers

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(GenerationRequest)
_control_decoder = msgspec.json.Decoder(ControlMessage)
_event_decoder = msgspec.json.Decoder(Event)
_chunk_decoder = msgspec.json.Decoder(TokenChunk)
_progress_decoder = msgspec.json.Decoder(Progress)


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def decode_chunk(data: bytes) -> TokenChunk:
    return _chunk_decoder.decode(data)


def decode_progress(data: bytes) -> Progress:
    return _progress_decoder.decode(data)


def decode_control(data: bytes) -> ControlMessage:
    return _control_decoder.decode(data)


def now_ms() -> int:
    return int(time.time() * 1000)


def output_headers(
    request_id: str,
    event_type: str,
    *,
    priority: str | None = None,
    attempt: str | None = None,
    traceparent: bytes | None = None,
) -> list[tuple[str, bytes]]:
    """Headers on every produced message, so Kafka UI users can read a stream without decoding."""
    headers = [
        ("content-type", b"application/json"),
        (PROTOCOL_HEADER, str(PROTOCOL_VERSION).encode()),
        ("request-id", request_id.encode()),
        ("event-type", event_type.encode()),
    ]
    if priority:
        headers.append(("priority", priority.encode()))
    if attempt:
        headers.append(("attempt", attempt.encode()))
    if traceparent:
        headers.append(("traceparent", traceparent))
    return headers


_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def valid_traceparent(value: bytes | None) -> bytes | None:
    """The W3C `traceparent` header if well formed (55 bytes), else None: it is copied to every
    output of the request, so an oversized or malformed one is dropped, not propagated."""
    if value is None or len(value) != 55 or not _TRACEPARENT.fullmatch(value):
        return None
    return value


def request_topic(prefix: str, priority: str) -> str:
    return f"{prefix}.requests.{priority}"


def tokens_topic(prefix: str) -> str:
    return f"{prefix}.tokens"


def events_topic(prefix: str) -> str:
    return f"{prefix}.events"


def control_topic(prefix: str) -> str:
    return f"{prefix}.control"


def progress_topic(prefix: str) -> str:
    return f"{prefix}.progress"


def dlq_topic(prefix: str) -> str:
    return f"{prefix}.requests.dlq"


def workers_topic(prefix: str) -> str:
    return f"{prefix}.workers"


# --------------------------------------------------------------------------------------------
# Worker announcements (llm.workers, compacted, key = worker name)


class WorkerStatus(Struct, frozen=True, kw_only=True):
    """What a worker announces about itself every `interval_ms` and whenever its readiness
    changes. A clean stop writes a tombstone (no value) for its key."""

    worker: str
    model: str  # the name clients ask for (the gateway's /v1/models)
    ready: bool
    ts: int  # epoch ms, the worker's clock
    interval_ms: int  # the next announcement is due within this


_status_decoder = msgspec.json.Decoder(WorkerStatus)


def decode_worker_status(data: bytes) -> WorkerStatus:
    return _status_decoder.decode(data)
