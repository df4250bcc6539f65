"""Tests of the wire structs (streamer.protocol) and request validation (streamer.validation)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import protocol
from streamer.protocol import (
    MAX_ID_LENGTH,
    PROTOCOL_HEADER,
    ChatMessage,
    ControlMessage,
    ErrorCode,
    ErrorInfo,
    Event,
    EventType,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenChunk,
    Usage,
)
from streamer.validation import DeadLetter, Rejection, RequestLimits, parse_request


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def rejected(result: object, code: ErrorCode = ErrorCode.INVALID_FIELD) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.code is code, result
    return result


def dead(result: object, code: ErrorCode | None = None) -> DeadLetter:
    assert isinstance(result, DeadLetter), result
    if code is not None:
        assert result.code is code, result
    return result


# ------------------------------------------------------------------------------------ structs


def test_generation_request_round_trip() -> None:
    request = GenerationRequest(
        id="r-1",
        messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi")],
        max_tokens=32,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop=["\n\n"],
        ignore_eos=True,
        deadline_ms=1_700_000_000_000,
        metadata={"user": "u1", "tags": ["a", 1, None]},
    )
    data = protocol.encode(request)
    assert msgspec.json.decode(data, type=GenerationRequest) == request
    assert parse_request(data) == request


def test_generation_request_omits_defaults() -> None:
    request = GenerationRequest(id="r-2", prompt="hello")
    assert json.loads(protocol.encode(request)) == {"id": "r-2", "prompt": "hello"}
    assert parse_request(protocol.encode(request)) == request


def test_token_chunk_round_trip() -> None:
    chunk = TokenChunk(request_id="r", attempt="a1", index=3, token_ids=[5, 6], text="lo")
    data = protocol.encode(chunk)
    assert json.loads(data) == {
        "request_id": "r",
        "attempt": "a1",
        "index": 3,
        "token_ids": [5, 6],
        "text": "lo",
    }
    assert protocol.decode_chunk(data) == chunk


def test_event_omits_unset_optional_fields() -> None:
    event = Event(request_id="r", type=EventType.QUEUED, worker="w0", ts=123)
    data = protocol.encode(event)
    assert json.loads(data) == {"request_id": "r", "type": "queued", "worker": "w0", "ts": 123}
    assert protocol.decode_event(data) == event


def test_completed_event_round_trip() -> None:
    event = Event(
        request_id="r",
        type=EventType.COMPLETED,
        attempt="a1",
        worker="w0",
        ts=123,
        priority="high",
        text="hello",
        finish_reason=FinishReason.LENGTH,
        usage=Usage(prompt_tokens=4, completion_tokens=2),
        timings=Timings(queue_ms=1.5, ttft_ms=None, e2e_ms=9.0),
        metadata={"k": "v"},
    )
    data = protocol.encode(event)
    raw = json.loads(data)
    assert raw["type"] == "completed" and raw["finish_reason"] == "length"
    assert raw["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}
    assert raw["timings"]["ttft_ms"] is None  # Timings does not omit defaults: the key is there
    assert "error" not in raw
    assert protocol.decode_event(data) == event


def test_rejected_event_carries_error() -> None:
    event = Event(
        request_id="r",
        type=EventType.REJECTED,
        worker="w0",
        ts=1,
        error=ErrorInfo(code=ErrorCode.INVALID_FIELD, message="`top_p` ..."),
    )
    raw = json.loads(protocol.encode(event))
    assert raw["error"] == {"code": "invalid_field", "message": "`top_p` ..."}
    assert set(raw) == {"request_id", "type", "worker", "ts", "error"}
    assert protocol.decode_event(protocol.encode(event)) == event


def test_event_types_terminal() -> None:
    terminal = {t for t in EventType if t.is_terminal}
    assert terminal == {"completed", "failed", "rejected", "cancelled", "expired"}
    assert not EventType.STARTED.is_terminal and not EventType.PREEMPTED.is_terminal


def test_control_message_round_trip_and_validation() -> None:
    message = ControlMessage(type="cancel", request_id="r-9")
    data = protocol.encode(message)
    assert json.loads(data) == {"type": "cancel", "request_id": "r-9"}
    assert protocol.decode_control(data) == message
    for bad in (
        {"type": "pause", "request_id": "r"},
        {"type": "cancel", "request_id": ""},
        {"type": "cancel", "request_id": "x" * (MAX_ID_LENGTH + 1)},
        {"type": "cancel"},
    ):
        with pytest.raises(msgspec.ValidationError):
            protocol.decode_control(json.dumps(bad).encode())


def test_output_headers() -> None:
    headers = protocol.output_headers("r-1", "completed")
    assert headers == [
        ("content-type", b"application/json"),
        (PROTOCOL_HEADER, b"1"),
        ("request-id", b"r-1"),
        ("event-type", b"completed"),
    ]
    full = dict(
        protocol.output_headers(
            "r-1", "tokens", priority="urgent", attempt="a-7", traceparent=b"00-abc-def-01"
        )
    )
    assert full["priority"] == b"urgent"
    assert full["attempt"] == b"a-7"
    assert full["traceparent"] == b"00-abc-def-01"
    assert full[PROTOCOL_HEADER] == str(protocol.PROTOCOL_VERSION).encode()
    assert all(isinstance(v, bytes) for v in full.values())


def test_topic_names() -> None:
    assert protocol.request_topic("llm", "low") == "llm.requests.low"
    assert protocol.tokens_topic("x") == "x.tokens"
    assert protocol.events_topic("x") == "x.events"
    assert protocol.control_topic("x") == "x.control"
    assert protocol.dlq_topic("x") == "x.requests.dlq"
    assert protocol.PRIORITIES == ("urgent", "high", "normal", "low")


# -------------------------------------------------------------------------- valid requests


def test_valid_prompt_request() -> None:
    result = parse_request(body(id="a", prompt="Hello", max_tokens=5, temperature=0.5))
    assert isinstance(result, GenerationRequest)
    assert (result.id, result.prompt, result.messages) == ("a", "Hello", None)
    assert (result.max_tokens, result.temperature, result.top_p, result.top_k) == (5, 0.5, 1.0, 0)
    assert result.stop == [] and result.seed is None and result.metadata is None


def test_valid_messages_request() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    result = parse_request(body(id="b", messages=messages, stop=["x"], metadata={"n": 1}))
    assert isinstance(result, GenerationRequest)
    assert result.prompt is None
    assert result.messages == [ChatMessage("user", "hi"), ChatMessage("assistant", "yo")]
    assert result.stop == ["x"] and result.metadata == {"n": 1}


def test_unknown_fields_are_ignored() -> None:
    result = parse_request(
        body(
            id="c",
            prompt="p",
            future_field={"a": [1, 2]},
            n=3,
            messages_v2=None,
        )
    )
    assert isinstance(result, GenerationRequest) and result.prompt == "p"
    result = parse_request(
        body(id="d", messages=[{"role": "user", "content": "hi", "name": "bob"}])
    )
    assert isinstance(result, GenerationRequest)


def test_id_of_max_length_is_accepted() -> None:
    result = parse_request(body(id="x" * MAX_ID_LENGTH, prompt="p"))
    assert isinstance(result, GenerationRequest)


def test_bounds_are_inclusive_where_documented() -> None:
    ok = parse_request(body(id="e", prompt="p", top_p=1.0, top_k=0, temperature=0, deadline_ms=0))
    assert isinstance(ok, GenerationRequest)
    ok = parse_request(body(id="e", prompt="p", seed=0, max_tokens=1))
    assert isinstance(ok, GenerationRequest)


# ------------------------------------------------------------------------------------ dead letters


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, ErrorCode.UNDECODABLE),
        (b"\xff\xfe\xfd", ErrorCode.UNDECODABLE),
        (b'{"id": "\xff\xfe", "prompt": "p"}', ErrorCode.UNDECODABLE),
        (b'{"id": "a", "prompt": ', ErrorCode.UNDECODABLE),
        (b"", ErrorCode.UNDECODABLE),
        (b"not json", ErrorCode.UNDECODABLE),
        (b'[{"id": "a"}]', ErrorCode.INVALID_ID),
        (b"42", ErrorCode.INVALID_ID),
        (b'"a string"', ErrorCode.INVALID_ID),
        (b"null", ErrorCode.INVALID_ID),
        (b'{"prompt": "p"}', ErrorCode.INVALID_ID),
        (b'{"id": "", "prompt": "p"}', ErrorCode.INVALID_ID),
        (b'{"id": 17, "prompt": "p"}', ErrorCode.INVALID_ID),
        (b'{"id": null, "prompt": "p"}', ErrorCode.INVALID_ID),
        (b'{"id": ["a"], "prompt": "p"}', ErrorCode.INVALID_ID),
        (body(id="x" * (MAX_ID_LENGTH + 1), prompt="p"), ErrorCode.INVALID_ID),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_dead_letters(value: bytes | None, code: ErrorCode) -> None:
    result = dead(parse_request(value), code)
    assert result.message


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": "a", "prompt": "p", "metadata": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"id": "a", "messages": ' + b"[" * 100_000,
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=["lists", "in-metadata", "unterminated", "objects"],
)
def test_deeply_nested_json_goes_to_the_dlq_without_raising(value: bytes) -> None:
    dead(parse_request(value), ErrorCode.UNDECODABLE)


def _call_at_depth(frames: int, fn: Any) -> Any:
    return fn() if frames == 0 else _call_at_depth(frames - 1, fn)


@pytest.mark.parametrize("depth", [40, 500, 900, 950, 980, 990, 995, 1000])
@pytest.mark.parametrize("frames", [0, 5, 50])
def test_nesting_near_the_recursion_limit_never_raises(depth: int, frames: int) -> None:
    # Whatever decodes must not fail later (re-encoding metadata) from a deeper stack.
    nested = b'{"a": ' * depth + b"1" + b"}" * depth
    for value in (
        b'{"id": "a", "prompt": "p", "metadata": ' + nested + b"}",
        b'{"id": "a", "prompt": "p", "stop": ' + b"[" * depth + b"]" * depth + b"}",
        b'{"id": "a", "messages": ' + b"[" * depth + b"]" * depth + b"}",
    ):
        result = _call_at_depth(frames, lambda value=value: parse_request(value))
        assert isinstance(result, Rejection | DeadLetter)


def test_metadata_depth_is_limited() -> None:
    def nest(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = {"a": value}
        return value

    assert isinstance(parse_request(body(id="m", prompt="p", metadata=nest(32))), GenerationRequest)
    result = rejected(parse_request(body(id="m", prompt="p", metadata=nest(33))))
    assert "metadata" in result.message and "max_metadata_depth=32" in result.message
    limits = RequestLimits(max_metadata_depth=2)
    ok = parse_request(body(id="m", prompt="p", metadata={"a": [1]}), limits=limits)
    assert isinstance(ok, GenerationRequest)
    rejected(parse_request(body(id="m", prompt="p", metadata={"a": [[1]]}), limits=limits))


def test_oversize_message_goes_to_the_dlq() -> None:
    limits = RequestLimits(max_message_bytes=100)
    value = body(id="big", prompt="x" * 200)
    result = dead(parse_request(value, limits=limits), ErrorCode.MESSAGE_TOO_LARGE)
    assert "max_message_bytes=100" in result.message and str(len(value)) in result.message
    exact = body(id="ok", prompt="")
    exact = body(id="ok", prompt="x" * (100 - len(exact)))
    assert len(exact) == 100
    assert isinstance(parse_request(exact, limits=limits), GenerationRequest)


def test_oversize_is_checked_before_decoding() -> None:
    limits = RequestLimits(max_message_bytes=10)
    dead(parse_request(b"\xff" * 11, limits=limits), ErrorCode.MESSAGE_TOO_LARGE)


# ------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": "7"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": "###"}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"metadata": ["a"]}, "metadata"),
        ({"metadata": "a"}, "metadata"),
        ({"deadline_ms": -1}, "deadline_ms"),
        ({"deadline_ms": "soon"}, "deadline_ms"),
        ({"prompt": 5}, "prompt"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_wrong_field_is_rejected_naming_it(fields: dict[str, Any], field: str) -> None:
    result = rejected(parse_request(body(**{"id": "r", "prompt": "p", **fields})))
    assert result.request_id == "r"
    assert field in result.message


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": 1, "content": "hi"}], "role"),
        (["hi"], "messages"),
        ("hi", "messages"),
        ([], "messages"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_messages_are_rejected_naming_the_field(messages: Any, field: str) -> None:
    result = rejected(parse_request(body(id="r", messages=messages)))
    assert field in result.message


def test_exactly_one_of_prompt_or_messages() -> None:
    both = body(id="r", prompt="p", messages=[{"role": "user", "content": "hi"}])
    result = rejected(parse_request(both), ErrorCode.INVALID_REQUEST)
    assert "prompt" in result.message and "messages" in result.message
    rejected(parse_request(body(id="r")), ErrorCode.INVALID_REQUEST)
    rejected(parse_request(body(id="r", prompt=None, messages=None)), ErrorCode.INVALID_REQUEST)


LIMITS = RequestLimits(
    max_prompt_chars=10,
    max_stop_strings=2,
    max_stop_string_chars=4,
    max_metadata_bytes=50,
    max_messages=2,
)


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"prompt": "x" * 11}, ErrorCode.PROMPT_TOO_LONG, "max_prompt_chars=10"),
        (
            {"messages": [{"role": "user", "content": "x" * 6}] * 2},
            ErrorCode.PROMPT_TOO_LONG,
            "max_prompt_chars=10",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}] * 3},
            ErrorCode.INVALID_FIELD,
            "max_messages=2",
        ),
        ({"prompt": "p", "stop": ["a", "b", "c"]}, ErrorCode.INVALID_FIELD, "max_stop_strings=2"),
        ({"prompt": "p", "stop": ["abcde"]}, ErrorCode.INVALID_FIELD, "max_stop_string_chars=4"),
        ({"prompt": "p", "stop": [""]}, ErrorCode.INVALID_FIELD, "`stop`"),
        (
            {"prompt": "p", "metadata": {"k": "v" * 60}},
            ErrorCode.INVALID_FIELD,
            "max_metadata_bytes=50",
        ),
    ],
    ids=lambda v: str(v)[:30],
)
def test_limits_are_rejected_naming_the_limit(
    fields: dict[str, Any], code: ErrorCode, needle: str
) -> None:
    result = rejected(parse_request(body(id="r", **fields), limits=LIMITS), code)
    assert needle in result.message


def test_values_at_the_limits_are_accepted() -> None:
    for fields in (
        {"prompt": "x" * 10},
        {"messages": [{"role": "user", "content": "x" * 5}] * 2},
        {"prompt": "p", "stop": ["abcd", "efgh"]},
        {"prompt": "p", "metadata": {"k": "v" * 40}},
    ):
        assert isinstance(parse_request(body(id="r", **fields), limits=LIMITS), GenerationRequest)


def test_default_limits() -> None:
    huge_metadata = {"k": "v" * 20_000}
    result = rejected(parse_request(body(id="r", prompt="p", metadata=huge_metadata)))
    assert "max_metadata_bytes=16384" in result.message
    result = rejected(parse_request(body(id="r", prompt="x" * 400_001)), ErrorCode.PROMPT_TOO_LONG)
    assert "max_prompt_chars=400000" in result.message
    assert isinstance(parse_request(body(id="r", prompt="x" * 400_000)), GenerationRequest)


def test_request_limits_validate() -> None:
    RequestLimits().validate()
    with pytest.raises(ValueError, match="max_stop_strings"):
        RequestLimits(max_stop_strings=0).validate()


# ------------------------------------------------------------------------- protocol header


@pytest.mark.parametrize("version", [b"1", b"1.3", b"1.0.7"])
def test_known_protocol_major_is_accepted(version: bytes) -> None:
    result = parse_request(body(id="r", prompt="p"), [(PROTOCOL_HEADER, version)])
    assert isinstance(result, GenerationRequest)


@pytest.mark.parametrize("version", [b"2", b"2.0", b"10", b"0", b"", b"v1"])
def test_unknown_protocol_major_is_rejected(version: bytes) -> None:
    result = rejected(
        parse_request(body(id="r", prompt="p"), [(PROTOCOL_HEADER, version)]),
        ErrorCode.UNSUPPORTED_PROTOCOL,
    )
    assert result.request_id == "r" and PROTOCOL_HEADER in result.message


def test_protocol_header_name_is_case_insensitive_and_others_are_ignored() -> None:
    headers = [("traceparent", b"00-x"), ("Streamer-Protocol", b"2")]
    rejected(parse_request(body(id="r", prompt="p"), headers), ErrorCode.UNSUPPORTED_PROTOCOL)
    result = parse_request(body(id="r", prompt="p"), [("content-type", b"application/json")])
    assert isinstance(result, GenerationRequest)


def test_protocol_header_does_not_rescue_a_record_without_id() -> None:
    dead(parse_request(b'{"prompt": "p"}', [(PROTOCOL_HEADER, b"2")]), ErrorCode.INVALID_ID)


# ------------------------------------------------------------------------------------ fuzz


def check_result(result: object, raw: Any = None) -> None:
    assert isinstance(result, GenerationRequest | Rejection | DeadLetter), result
    if isinstance(result, DeadLetter):
        assert isinstance(result.code, ErrorCode) and result.message
    elif isinstance(result, Rejection):
        assert isinstance(result.code, ErrorCode) and result.message
        if isinstance(raw, dict):
            assert result.request_id == raw["id"]
    else:
        assert (result.prompt is None) != (result.messages is None)
        assert 1 <= len(result.id) <= MAX_ID_LENGTH


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [f for f in GenerationRequest.__struct_fields__ if f != "id"]
request_like = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=MAX_ID_LENGTH)},
    optional={
        **{name: json_values for name in FIELDS},
        "prompt": st.text(max_size=30) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {}, optional={"role": json_values | st.text(), "content": json_values | st.text()}
            ),
            max_size=3,
        )
        | json_values,
        "max_tokens": st.integers(-5, 2**70) | json_values,
        "top_p": st.floats(-1, 2) | json_values,
    },
)
headers = st.lists(
    st.tuples(
        st.sampled_from([PROTOCOL_HEADER, "Streamer-Protocol", "other"]), st.binary(max_size=6)
    ),
    max_size=2,
)
SMALL = RequestLimits(
    max_message_bytes=2_000,
    max_prompt_chars=20,
    max_stop_strings=2,
    max_stop_string_chars=3,
    max_metadata_bytes=60,
    max_messages=2,
    max_metadata_depth=2,
)

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(value=st.binary(max_size=200), hdrs=headers)
def test_fuzz_arbitrary_bytes(value: bytes, hdrs: list[tuple[str, bytes]]) -> None:
    check_result(parse_request(value, hdrs))
    check_result(parse_request(value, hdrs, SMALL))


@fuzz
@given(value=json_values, hdrs=headers)
def test_fuzz_arbitrary_json(value: Any, hdrs: list[tuple[str, bytes]]) -> None:
    data = json.dumps(value).encode()
    check_result(parse_request(data, hdrs))
    check_result(parse_request(data, hdrs, SMALL))


@fuzz
@given(raw=request_like, hdrs=headers)
def test_fuzz_request_like_objects(raw: dict[str, Any], hdrs: list[tuple[str, bytes]]) -> None:
    data = json.dumps(raw).encode()
    for limits in (None, SMALL):
        result = parse_request(data, hdrs, limits)
        check_result(result, raw)
        if isinstance(result, GenerationRequest):
            # What validation lets through re-encodes (events carry metadata) and round-trips.
            assert parse_request(protocol.encode(result), (), limits) == result
