"""Decode and validate request records: every record ends as a request, a rejection or a DLQ entry.

The order matters. Without a usable id nobody can be told about a rejection, so those records go to
the DLQ; with an id, a wrong field is a `rejected` event naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from streamer.protocol import (
    MAX_ID_LENGTH,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorCode,
    GenerationRequest,
)


@dataclass(frozen=True)
class RequestLimits:
    """Limits applied before any tokenization; defaults are safe for shared clusters."""

    max_message_bytes: int = 1_000_000
    """Records larger than this go to the DLQ undecoded."""
    max_prompt_chars: int = 400_000
    """Prompt (or all message contents together) longer than this is rejected before tokenizing."""
    max_stop_strings: int = 16
    """Most stop strings one request may give."""
    max_stop_string_chars: int = 256
    """Longest stop string, in characters."""
    max_metadata_bytes: int = 16_384
    """Largest `metadata`, in bytes of JSON."""
    max_metadata_depth: int = 32
    """Nesting of `metadata`; it is re-encoded on events, where deep nesting would overflow."""
    max_messages: int = 512
    """Most chat messages in one request."""

    def validate(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"request limits must be positive integers: {bad}")


@dataclass(frozen=True)
class DeadLetter:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Rejection:
    request_id: str
    code: ErrorCode
    message: str


ParseResult = GenerationRequest | Rejection | DeadLetter


def parse_request(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] = (),
    limits: RequestLimits | None = None,
) -> ParseResult:
    """Turn one request record's value into a request, a rejection, or a dead letter."""
    limits = limits or RequestLimits()
    if value is None:
        return DeadLetter(ErrorCode.UNDECODABLE, "record has no value (tombstone)")
    size = record_size(value, headers)
    if size > limits.max_message_bytes:
        return DeadLetter(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"record is {size} bytes (value and headers); the limit is "
            f"max_message_bytes={limits.max_message_bytes}",
        )
    try:
        raw = msgspec.json.decode(value)
    # RecursionError: msgspec recurses on deeply nested JSON; it must never kill the worker.
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as exc:
        return DeadLetter(ErrorCode.UNDECODABLE, f"not valid UTF-8 JSON: {short(exc)}")
    if not isinstance(raw, dict):
        return DeadLetter(ErrorCode.INVALID_ID, f"expected a JSON object, got {type(raw).__name__}")
    request_id = raw.get("id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_ID_LENGTH:
        return DeadLetter(
            ErrorCode.INVALID_ID, f"`id` must be a string of 1-{MAX_ID_LENGTH} characters"
        )

    version = _header(headers, PROTOCOL_HEADER)
    if version is not None and version.split(b".")[0] != str(PROTOCOL_VERSION).encode():
        return Rejection(
            request_id,
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"{PROTOCOL_HEADER} header {short(repr(version), 64)} names an unknown major version; "
            f"this worker speaks {PROTOCOL_VERSION}",
        )
    try:
        request = msgspec.convert(raw, GenerationRequest)
    except (msgspec.ValidationError, RecursionError) as exc:
        return Rejection(request_id, ErrorCode.INVALID_FIELD, short(exc))
    problem = _semantic_problem(request, limits)
    if problem is not None:
        code, message = problem
        return Rejection(request_id, code, message)
    return request


def _semantic_problem(
    request: GenerationRequest, limits: RequestLimits
) -> tuple[ErrorCode, str] | None:
    if (request.prompt is None) == (request.messages is None):
        return ErrorCode.INVALID_REQUEST, "give exactly one of `prompt` or `messages`"
    if request.messages is not None:
        if not request.messages:
            return ErrorCode.INVALID_FIELD, "`messages` must not be empty"
        if len(request.messages) > limits.max_messages:
            return ErrorCode.INVALID_FIELD, (
                f"`messages` has {len(request.messages)} entries; limit max_messages="
                f"{limits.max_messages}"
            )
    chars = prompt_chars(request)
    if chars > limits.max_prompt_chars:
        return ErrorCode.PROMPT_TOO_LONG, (
            f"prompt is {chars} characters; limit max_prompt_chars={limits.max_prompt_chars}"
        )
    if len(request.stop) > limits.max_stop_strings:
        return ErrorCode.INVALID_FIELD, (
            f"`stop` has {len(request.stop)} strings; limit max_stop_strings="
            f"{limits.max_stop_strings}"
        )
    for stop in request.stop:
        if not stop:
            return ErrorCode.INVALID_FIELD, "`stop` strings must not be empty"
        if len(stop) > limits.max_stop_string_chars:
            return ErrorCode.INVALID_FIELD, (
                f"a `stop` string has {len(stop)} characters; limit max_stop_string_chars="
                f"{limits.max_stop_string_chars}"
            )
    if request.metadata is not None:
        depth = _nesting(request.metadata)
        if depth > limits.max_metadata_depth:
            return ErrorCode.INVALID_FIELD, (
                f"`metadata` is nested {depth} levels deep; limit max_metadata_depth="
                f"{limits.max_metadata_depth}"
            )
        size = len(msgspec.json.encode(request.metadata))
        if size > limits.max_metadata_bytes:
            return ErrorCode.INVALID_FIELD, (
                f"`metadata` is {size} bytes as JSON; limit max_metadata_bytes="
                f"{limits.max_metadata_bytes}"
            )
    return None


def prompt_chars(request: GenerationRequest) -> int:
    """Characters of the prompt, or of all message contents together."""
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.content) for m in request.messages or ())


def record_size(value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """Bytes of a record's value and headers: both travel with it and both are echoed."""
    return len(value or b"") + sum(len(k) + len(v or b"") for k, v in headers)


def _nesting(value: object) -> int:
    """Levels of nested objects/arrays, counted without recursion (the value may be deep)."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    for key, val in headers:
        if key.lower() == name:
            return val
    return None


def short(exc: BaseException | str, limit: int = 300) -> str:
    text = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
