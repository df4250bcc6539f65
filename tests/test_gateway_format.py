"""The gateway's pure parts: OpenAI request/response mapping, errors, auth, batch lines, config."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import until

from streamer import protocol
from streamer.config import GatewayConfig
from streamer.gateway import openai_format as fmt
from streamer.gateway.auth import ApiKeys, load_keys
from streamer.gateway.batches import parse_lines, window_seconds
from streamer.gateway.fleet import FleetView
from streamer.protocol import ErrorInfo, Event, EventType, Usage
from streamer.settings import load_gateway_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _event(type_: EventType, **kw: object) -> Event:
    return Event(request_id="r", type=type_, worker="w", ts=1, **kw)  # type: ignore[arg-type]


def test_chat_request_maps_to_protocol_fields() -> None:
    parsed = fmt.parse_request("chat", {
        **CHAT, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "seed": 3, "stop": "END", "user": "u1", "n": 1, "stream": True,
        "stream_options": {"include_usage": True}, "priority": "high",
        "frequency_penalty": 0.2, "some_future_field": {"x": 1},  # unknown: ignored
    })
    assert parsed.fields == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                             "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["END"],
                             "metadata": {"user": "u1"}}
    assert parsed.stream and parsed.include_usage and parsed.priority == "high"
    assert parsed.model == "m"


def test_message_content_parts_and_developer_role() -> None:
    parsed = fmt.parse_request("chat", {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert parsed.fields["messages"] == [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "ab"},
                                         {"role": "assistant", "content": ""}]


def test_completion_prompt_forms() -> None:
    assert fmt.parse_request("completion", {"model": "m", "prompt": "x"}).fields == {"prompt": "x"}
    assert fmt.parse_request("completion", {"model": "m", "prompt": ["x"]}).fields["prompt"] == "x"
    for bad, code in ((["a", "b"], "unsupported_parameter"), ([1, 2], "invalid_request"),
                      (None, "invalid_request")):
        with pytest.raises(fmt.ApiError) as err:
            fmt.parse_request("completion", {"model": "m", "prompt": bad})
        assert err.value.status == 400 and err.value.code == code


@pytest.mark.parametrize(("body", "param"), [
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "logprobs": True}, "logprobs"),
    ({**CHAT, "best_of": 3}, "best_of"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
    ({**CHAT, "temperature": True}, "temperature"),
    ({**CHAT, "stop": [1]}, "stop"),
    ({**CHAT, "priority": "vip"}, "priority"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT["messages"]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
def test_invalid_parameters_are_400_naming_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(fmt.ApiError) as err:
        fmt.parse_request("chat", body)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_body_must_be_an_object() -> None:
    with pytest.raises(fmt.ApiError):
        fmt.parse_request("chat", [1])


@pytest.mark.parametrize(("reason", "expected"),
                         [("eos", "stop"), ("stop", "stop"), ("length", "length"), (None, "stop")])
def test_finish_reason_mapping(reason: str | None, expected: str) -> None:
    assert fmt.finish_reason(reason) == expected


def test_completion_bodies_and_usage() -> None:
    done = _event(EventType.COMPLETED, text="hey", finish_reason=protocol.FinishReason.EOS,
                  usage=Usage(prompt_tokens=3, completion_tokens=2))
    chat = fmt.completion_body("chat", "id1", "m", 10, "hey", done)
    assert chat["object"] == "chat.completion"
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hey"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = fmt.completion_body("completion", "id1", "m", 10, "hey", done)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hey"


def test_stream_chunks() -> None:
    first = fmt.chunk_body("chat", "i", "m", 1, text="", first=True, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None  # null on every chunk but the usage chunk
    last = fmt.chunk_body("chat", "i", "m", 1, reason="length")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"} and "usage" not in last
    done = _event(EventType.COMPLETED, usage=Usage(prompt_tokens=1, completion_tokens=1))
    usage = fmt.usage_chunk("completion", "i", "m", 1, done)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 2
    line = fmt.sse({"a": 1})
    assert line == b'data: {"a":1}\n\n' and fmt.DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(("event", "status", "code"), [
    (_event(EventType.REJECTED, error=ErrorInfo(code="max_tokens_too_large", message="too many")),
     400, "max_tokens_too_large"),
    (_event(EventType.EXPIRED), 504, "deadline_exceeded"),
    (_event(EventType.CANCELLED), 499, "cancelled"),
    (_event(EventType.FAILED, error=ErrorInfo(code="model_error", message="boom")), 500,
     "model_error"),
])
def test_outcome_errors(event: Event, status: int, code: str) -> None:
    error = fmt.outcome_error(event)
    assert (error.status, error.code) == (status, code)
    if event.error:
        assert error.body()["error"]["message"] == event.error.message


def test_stream_text_survives_a_restarted_attempt() -> None:
    text = fmt.StreamText()
    assert text.add("Hel") == "Hel" and text.add("lo") == "lo"
    text.restart()
    assert text.add("He") == ""  # the new attempt replays what was sent: nothing new yet
    assert text.add("llo wor") == " wor"
    assert text.add("ld") == "ld" and text.sent_chars == len("Hello world")
    text.restart()
    with pytest.raises(fmt.Diverged):
        text.add("Goodbye")


def test_api_keys() -> None:
    keys = ApiKeys(["k1", "k2"])
    keys.check("Bearer k2")
    for header in (None, "Bearer nope", "k1", "Basic k1"):
        with pytest.raises(fmt.ApiError) as err:
            keys.check(header)
        assert err.value.status == 401 and "k1" not in err.value.message
    ApiKeys([]).check(None)  # no keys: no authentication
    assert "k1" not in repr(keys)


def test_api_keys_from_a_file(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nka\n\n kb \n")
    assert load_keys(["kc", ""], str(path)) == ("kc", "ka", "kb")


def test_gateway_config_from_flags_and_env_and_keys_are_never_shown() -> None:
    config = load_gateway_config({"port": "0", "max_backlog": "none"},
                                 {"STREAMER_GATEWAY_API_KEYS": "s3cret,other",
                                  "STREAMER_PREFIX": "p1", "KAFKA_BOOTSTRAP_SERVERS": "h:1"})
    assert config.port == 0 and config.max_backlog is None and config.prefix == "p1"
    assert config.api_keys == ("s3cret", "other") and config.kafka.bootstrap_servers == "h:1"
    assert "s3cret" not in repr(config)
    with pytest.raises(ValueError, match="default_priority"):
        GatewayConfig(default_priority="vip").validate()


def test_batch_lines() -> None:
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    bad_url = {**good, "custom_id": "b", "url": "/v1/completions"}
    bad_field = {**good, "custom_id": "c", "body": {**CHAT, "temperature": -1}}
    content = "\n".join(json.dumps(x) for x in (good, bad_url, bad_field)).encode() + b"\n\n"
    lines = parse_lines(content, "/v1/chat/completions", 99, "batch_x")
    assert [line.custom_id for line in lines] == ["a", "b", "c"]
    assert lines[0].error is None and lines[0].payload is not None
    request = json.loads(lines[0].payload)
    assert request["id"] == "batch_x-0" and request["deadline_ms"] == 99
    assert lines[1].error is not None and lines[2].error.code == "invalid_field"
    with pytest.raises(fmt.ApiError):
        parse_lines(b"not json", "/v1/chat/completions", 1, "b")
    with pytest.raises(fmt.ApiError, match="unique"):
        parse_lines(content + content, "/v1/chat/completions", 1, "b")
    assert window_seconds("24h") == 86400
    with pytest.raises(fmt.ApiError):
        window_seconds("1d")


def test_fleet_view_models_readiness_and_backlog() -> None:
    view = FleetView(GatewayConfig().kafka, "p", "g", ttl_s=10, refresh_s=1, max_backlog=5)
    with pytest.raises(fmt.ApiError) as err:
        view.check_model("m")
    assert err.value.status == 503  # nothing announced

    def status(name: str, ready: bool, ts: int | None = None) -> bytes:
        return protocol.encode(protocol.WorkerStatus(
            worker=name, model="m", ready=ready, ts=ts or protocol.now_ms(), interval_ms=1000))

    view._on_record(b"w1", status("w1", False))
    with pytest.raises(fmt.ApiError) as err:
        view.check_model("m")
    assert err.value.status == 503
    with pytest.raises(fmt.ApiError) as err:
        view.check_model("other")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    view._on_record(b"w2", status("w2", True))
    view.check_model("m")
    assert [(m.name, m.workers, m.ready) for m in view.models()] == [("m", 2, 1)]
    view._on_record(b"w2", None)  # tombstone: a clean stop
    view._on_record(b"w3", status("w3", True, ts=protocol.now_ms() - 60_000))  # gone silent
    assert view.ready_workers() == 0
    view.backlog = {"low": 6, "normal": 5}
    view.check_lane("normal")
    with pytest.raises(fmt.ApiError) as err:
        view.check_lane("low")
    assert err.value.status == 429


async def test_announcer_sends_status_on_change_and_a_tombstone_on_stop() -> None:
    from streamer.health.announce import Announcer

    sent: list[tuple[str, bytes | None, bytes]] = []
    ready = {"now": False}

    async def send(topic: str, value: bytes | None, key: bytes) -> asyncio.Future[None]:
        sent.append((topic, value, key))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    announcer = Announcer(send, "p", "w1", "m", lambda: ready["now"], interval_s=3600)
    await announcer.start()
    try:
        await until(lambda: len(sent) == 1, what="the first announcement")
        ready["now"] = True  # a change is announced without waiting for the interval
        await until(lambda: len(sent) == 2, what="the readiness change")
    finally:
        await announcer.stop()
    first, second = (protocol.decode_worker_status(v) for _, v, _ in sent[:2])  # type: ignore[arg-type]
    assert (first.ready, second.ready, second.model, second.interval_ms) == (False, True, "m",
                                                                             3_600_000)
    assert sent[-1] == ("p.workers", None, b"w1")  # the tombstone of a clean stop
