"""OpenAI's request and response shapes, mapped to and from the wire protocol. Pure code.

Requests: a `/v1/chat/completions` or `/v1/completions` body becomes the fields of a
`GenerationRequest` plus what only the gateway uses (model, stream, usage in the stream,
priority). Unknown fields are ignored, as the protocol does; parameters the fleet cannot honour
(`n` > 1, logprobs, echo, best_of, suffix) are refused with a 400 naming the parameter.
Responses: completed events become completion objects, token text becomes SSE chunks, and
terminal events that are not `completed` become OpenAI error bodies with their HTTP status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from streamer.protocol import PRIORITIES, Event, EventType

Kind = Literal["chat", "completion"]

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 429: "rate_limit_error", 499: "request_cancelled",
               500: "server_error", 503: "service_unavailable", 504: "timeout"}

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""The protocol's finish_reason -> OpenAI's: an end-of-sequence token is a natural stop."""

UNSUPPORTED = {"logprobs": "logprobs are not returned by the fleet",
               "top_logprobs": "logprobs are not returned by the fleet",
               "echo": "echo is not supported", "suffix": "suffix is not supported"}

DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    model: str
    fields: dict[str, Any]
    """Keyword fields of a GenerationRequest (prompt or messages, max_tokens, sampling...)."""
    stream: bool = False
    include_usage: bool = False
    priority: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- requests


def parse_request(kind: Kind, body: Any) -> ParsedRequest:
    """The body of a chat or completions call; ApiError(400) names what is wrong."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("`model` is required: one of the names /v1/models lists", "model")
    fields: dict[str, Any] = {}
    if kind == "chat":
        fields["messages"] = _messages(body.get("messages"))
    else:
        fields["prompt"] = _prompt(body.get("prompt"))
    for name, reason in UNSUPPORTED.items():
        if body.get(name) not in (None, False, 0, ""):
            raise invalid(reason, name, "unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid(f"n={n!r}: the fleet returns one choice per request; send n=1 (or "
                      "several requests)", "n", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise invalid(f"best_of={best_of!r} is not supported", "best_of", "unsupported_parameter")
    # max_completion_tokens is the newer name; it wins when both are given.
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            fields["max_tokens"] = _number(body, name, int)
            break
    for name, kind_ in (("temperature", float), ("top_p", float), ("seed", int),
                        ("top_k", int)):
        if body.get(name) is not None:
            fields[name] = _number(body, name, kind_)
    if body.get("ignore_eos") is not None:
        fields["ignore_eos"] = _bool(body, "ignore_eos")
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else stop
        if not isinstance(fields["stop"], list) or not all(
                isinstance(s, str) for s in fields["stop"]):
            raise invalid("`stop` must be a string or a list of strings", "stop")
    metadata: dict[str, Any] = {}
    if isinstance(body.get("metadata"), dict):
        metadata.update(body["metadata"])
    if body.get("user") is not None:
        if not isinstance(body["user"], str):
            raise invalid("`user` must be a string", "user")
        metadata["user"] = body["user"]
    if metadata:
        fields["metadata"] = metadata
    stream = _bool(body, "stream") if body.get("stream") is not None else False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("`stream_options` must be an object", "stream_options")
        include_usage = bool(options.get("include_usage"))
    priority = body.get("priority")
    if priority is not None:
        priority = check_priority(priority, "priority")
    return ParsedRequest(kind, model, fields, stream, include_usage, priority)


def check_priority(value: Any, where: str) -> str:
    if value not in PRIORITIES:
        raise invalid(f"{where}={value!r}; expected one of {', '.join(PRIORITIES)}", where)
    return str(value)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("`messages` must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] needs a string `role`", f"messages[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": _content(message.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"messages[{i}].content: only text parts are supported",
                              f"messages[{i}].content")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts",
                  f"messages[{i}].content")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        raise invalid("one prompt per request: send a list of prompts as several requests",
                      "prompt", "unsupported_parameter")
    raise invalid("`prompt` must be a string (token-id prompts are not supported)", "prompt")


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body[name]
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        raise invalid(f"`{name}` must be {'an integer' if kind is int else 'a number'}, "
                      f"got {value!r}", name, "invalid_field")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    if not isinstance(body[name], bool):
        raise invalid(f"`{name}` must be true or false", name, "invalid_field")
    return bool(body[name])


# ------------------------------------------------------------------------------ responses


def finish_reason(reason: str | None) -> str:
    return FINISH_REASONS.get(str(reason) if reason else "", "stop")


def usage(event: Event) -> dict[str, int]:
    u = event.usage
    prompt, completion = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_body(kind: Kind, rid: str, model: str, created: int, text: str,
                    event: Event) -> dict[str, Any]:
    """The non-streamed answer to a completed request."""
    reason = finish_reason(event.finish_reason)
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage(event)}


def chunk_body(kind: Kind, rid: str, model: str, created: int, *, text: str | None = None,
               reason: str | None = None, first: bool = False,
               include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk; `first` gives a chat delta its role."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk(kind: Kind, rid: str, model: str, created: int, event: Event) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(event)}


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def outcome_error(event: Event) -> ApiError:
    """The HTTP error for a terminal event that is not `completed`."""
    error = event.error
    if event.type is EventType.REJECTED:
        return ApiError(400, error.message if error else "rejected by the worker",
                        code=error.code if error else "rejected")
    if event.type is EventType.EXPIRED:
        return ApiError(504, "the request's deadline passed before it finished",
                        code="deadline_exceeded")
    if event.type is EventType.CANCELLED:
        return ApiError(499, "the request was cancelled", code="cancelled")
    return ApiError(500, error.message if error else "the worker failed the request",
                    code=error.code if error else "failed")


class Diverged(Exception):
    """A new attempt's text differs from what the HTTP client already received."""


class StreamText:
    """The text sent to one HTTP client, kept consistent when a worker restarts the request.

    Text cannot be taken back once streamed, so after a RESTART the new attempt's text is held
    until it passes what was sent; it must begin with that text (greedy or seeded sampling makes
    it so) or the stream ends with an error (Diverged)."""

    def __init__(self) -> None:
        self.sent_chars = 0
        self._sent: list[str] = []
        self._replay: str | None = None  # the new attempt's text while it catches up

    def restart(self) -> None:
        self._replay = ""

    def add(self, text: str) -> str:
        """The part of `text` to send now."""
        if self._replay is None:
            self._sent.append(text)
            self.sent_chars += len(text)
            return text
        self._replay += text
        sent = "".join(self._sent)
        self._sent = [sent]
        common = min(len(sent), len(self._replay))
        if self._replay[:common] != sent[:common]:
            raise Diverged("the restarted request produced different text")
        if len(self._replay) <= len(sent):
            return ""
        delta, self._replay = self._replay[len(sent):], None
        self._sent.append(delta)
        self.sent_chars += len(delta)
        return delta
