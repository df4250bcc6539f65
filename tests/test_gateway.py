"""The OpenAI gateway against real parts: the broker, a `streamer worker` process on the tiny
model, `streamer gateway` processes on free ports, and the official `openai` SDK.

One worker serves the whole module (a gate file, open unless a test holds it); tests that need
a gateway with other settings start their own against the same fleet."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import ROOT, WORKER_ENV, Gate, WorkerProc, until
from gateway_helpers import GatewayProc, Gateways
from reference import PROMPTS, _load, greedy_text

from streamer import protocol
from streamer.client import StreamerClient
from streamer.config import KafkaSettings
from streamer.partitioning import partition_for
from streamer.topics import apply_topics

pytestmark = pytest.mark.kafka


@dataclass
class Fleet:
    prefix: str
    worker: WorkerProc
    gate: Gate
    gateways: Gateways
    gateway: GatewayProc
    model: Path
    kafka: KafkaSettings

    def sdk(self, gateway: GatewayProc | None = None, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=(gateway or self.gateway).url + "/v1",
                                  api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
async def fleet(kafka_settings: KafkaSettings, kafka_bootstrap: str, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    prefix = f"g{uuid.uuid4().hex[:10]}"
    await apply_topics(kafka_settings, prefix)
    tmp = tmp_path_factory.mktemp("gateway")
    gate = Gate(tmp / "gate")
    log_path = tmp / "worker.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "worker", "--model", str(tiny_model),
             "--prefix", prefix, "--metrics-port", "0", "--worker-id", "gw-worker",
             "--bootstrap-servers", kafka_bootstrap],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **WORKER_ENV, **gate.env})
    worker = WorkerProc(process, log_path, "gw-worker")
    gateways = Gateways(kafka_bootstrap, tmp)
    try:
        await worker.await_for("partitions_assigned")
        gateway = gateways.start(prefix)
        await asyncio.to_thread(gateway.wait_ready)
        yield Fleet(prefix, worker, gate, gateways, gateway, tiny_model, kafka_settings)
    finally:
        gate.release()
        gateways.close()
        worker.kill()


def chat_reference(path: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    """transformers' greedy generate() on the chat template's rendering, as the worker does."""
    tokenizer, model = _load(str(path))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


async def outcome_of(kafka: KafkaSettings, prefix: str, request_id: str) -> protocol.Event:
    """The first terminal event of `request_id`, read from the start of its events partition."""
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = protocol.events_topic(prefix)
        await consumer.topics()
        count = len(consumer.partitions_for_topic(topic) or ())
        tp = TopicPartition(topic, partition_for(request_id.encode(), count))
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if record.key == request_id.encode():
                    event = protocol.decode_event(record.value)
                    if event.type.is_terminal:
                        return event
    finally:
        await consumer.stop()


async def test_models_lists_what_the_workers_announce(fleet: Fleet) -> None:
    models = await fleet.sdk().models.list()
    assert [m.id for m in models.data] == [fleet.model.name]
    assert (await fleet.sdk().models.retrieve(fleet.model.name)).id == fleet.model.name
    with pytest.raises(openai.NotFoundError):
        await fleet.sdk().models.retrieve("no-such-model")


async def test_completions_equal_the_reference_streamed_or_not(fleet: Fleet) -> None:
    sdk = fleet.sdk()
    expected = greedy_text(fleet.model, PROMPTS[0], 12)
    whole = await sdk.completions.create(model=fleet.model.name, prompt=PROMPTS[0],
                                         max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    pieces, usage = [], None
    stream = await sdk.completions.create(model=fleet.model.name, prompt=PROMPTS[0],
                                          max_tokens=12, stream=True,
                                          stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == expected
    assert usage is not None and usage == whole.usage


async def test_chat_equals_the_reference_streamed_or_not(fleet: Fleet) -> None:
    sdk = fleet.sdk()
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Tell me about Kafka"}]
    expected = chat_reference(fleet.model, messages, 10)
    whole = await sdk.chat.completions.create(model=fleet.model.name, messages=messages,
                                              max_completion_tokens=10)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion"
    pieces, reasons = [], []
    stream = await sdk.chat.completions.create(model=fleet.model.name, messages=messages,
                                               max_tokens=10, stream=True)
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}


async def test_a_rejected_request_raises_bad_request_with_the_workers_message(
    fleet: Fleet,
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await fleet.sdk().completions.create(model=fleet.model.name, prompt="hi",
                                                 max_tokens=10**6, stream=stream)
        assert err.value.code == "max_tokens_too_large"
    # The same request sent to the fleet directly: the worker's own words.
    async with StreamerClient(fleet.kafka, fleet.prefix) as client:
        handle = await client.submit("hi", max_tokens=10**6)
        outcome = (await handle.result(120)).outcome
    assert outcome.type is protocol.EventType.REJECTED and outcome.error is not None
    assert err.value.body["message"] == outcome.error.message  # type: ignore[index]


async def test_unknown_model_and_unsupported_n_are_refused(fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await fleet.sdk().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as n:
        await fleet.sdk().chat.completions.create(
            model=fleet.model.name, messages=[{"role": "user", "content": "hi"}], n=2)
    assert n.value.body["param"] == "n"  # type: ignore[index]


async def test_priority_user_and_unknown_fields_reach_the_request(fleet: Fleet) -> None:
    sdk = fleet.sdk()
    name = fleet.model.name
    default = await sdk.completions.create(model=name, prompt="a", max_tokens=2, user="alice",
                                           extra_body={"not_an_openai_field": [1, 2]})
    header = await sdk.completions.create(model=name, prompt="a", max_tokens=2,
                                          extra_headers={"x-streamer-priority": "high"})
    field = await sdk.completions.create(model=name, prompt="a", max_tokens=2,
                                         extra_body={"priority": "urgent"})
    events = [await outcome_of(fleet.kafka, fleet.prefix, r.id) for r in (default, header, field)]
    assert [e.priority for e in events] == ["normal", "high", "urgent"]
    assert events[0].metadata == {"user": "alice"}


async def test_disconnecting_mid_stream_cancels_the_request_on_the_worker(fleet: Fleet) -> None:
    fleet.gate.hold_at(3)  # the request holds at 3 tokens: still running when the client leaves
    try:
        async with StreamerClient(fleet.kafka, fleet.prefix) as client:
            stream = await fleet.sdk().completions.create(
                model=fleet.model.name, prompt=PROMPTS[1], max_tokens=900, stream=True,
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    break
            handle = await client.follow(chunk.id)  # the request id; its outcome comes later
            await stream.close()  # the HTTP connection goes away
            result = await handle.result(120)
        assert result.outcome.type is protocol.EventType.CANCELLED
    finally:
        fleet.gate.release()

    async def cancels() -> float:
        text = httpx.get(fleet.gateway.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("streamer_gateway_cancels_total"))

    assert await cancels() >= 1


async def test_a_client_leaving_a_non_streamed_request_cancels_it(fleet: Fleet) -> None:
    """Not streamed, the request id is only in the answer: the outcome is found by its `user`."""
    user = f"leaver-{uuid.uuid4().hex[:8]}"
    fleet.gate.hold_at(3)
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            waiting = asyncio.create_task(http.post(fleet.gateway.url + "/v1/completions", json={
                "model": fleet.model.name, "prompt": PROMPTS[2], "max_tokens": 900,
                "ignore_eos": True, "user": user}))

            def open_requests() -> float:
                text = httpx.get(fleet.gateway.url + "/metrics").text
                return next(float(line.split()[-1]) for line in text.splitlines()
                            if line.startswith("streamer_gateway_open_streams "))

            await until(lambda: open_requests() >= 1, what="the request is in the fleet")
            waiting.cancel()  # the HTTP connection is dropped without an answer
            with pytest.raises(asyncio.CancelledError):
                await waiting
        outcome = await outcome_with_user(fleet.kafka, fleet.prefix, user)
        assert outcome.type is protocol.EventType.CANCELLED
    finally:
        fleet.gate.release()


async def outcome_with_user(kafka: KafkaSettings, prefix: str, user: str) -> protocol.Event:
    """The terminal event whose echoed metadata names `user`, read from the events' start."""
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = protocol.events_topic(prefix)
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = protocol.decode_event(record.value)
                    if event.type.is_terminal and (event.metadata or {}).get("user") == user:
                        return event
    finally:
        await consumer.stop()


async def test_a_saturated_lane_is_429_and_a_passed_deadline_504(fleet: Fleet) -> None:
    gateway = fleet.gateways.start(fleet.prefix, "--max-backlog", "0",
                                   "--backlog-refresh-s", "0.2")
    await asyncio.to_thread(gateway.wait_ready)
    fleet.gate.hold()  # nothing finishes: a request on the low lane stays in its backlog
    try:
        async with StreamerClient(fleet.kafka, fleet.prefix) as client:
            await client.submit("fill the lane", priority="low", max_tokens=2)

            def low_backlog() -> bool:
                text = httpx.get(gateway.url + "/metrics").text
                return any(line.startswith('streamer_gateway_lane_backlog{lane="low"}')
                           and float(line.split()[-1]) >= 1 for line in text.splitlines())

            await until(low_backlog, what="the gateway sees the low lane's backlog")
            sdk = fleet.sdk(gateway)
            body = {"model": fleet.model.name, "prompt": "x", "max_tokens": 2}
            with pytest.raises(openai.RateLimitError) as by_header:
                await sdk.completions.create(**body, extra_headers={"x-streamer-priority": "low"})
            assert by_header.value.code == "lane_saturated"
            with pytest.raises(openai.RateLimitError):
                await sdk.completions.create(**body, extra_body={"priority": "low"})
            # Another lane is not saturated; with the engine held its 1 s deadline passes.
            with pytest.raises(openai.APIStatusError) as late:
                await fleet.sdk().completions.create(
                    **body, extra_headers={"x-streamer-priority": "urgent",
                                           "x-streamer-timeout": "1"})
            assert late.value.status_code == 504
    finally:
        fleet.gate.release()


async def test_api_keys_are_required_when_set_and_never_logged(fleet: Fleet, tmp_path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("file-key-456\n")
    gateway = fleet.gateways.start(fleet.prefix, "--api-key-file", str(key_file),
                                   env={"STREAMER_GATEWAY_API_KEYS": "env-key-123"})
    await asyncio.to_thread(gateway.wait_ready)
    with pytest.raises(openai.AuthenticationError):
        await fleet.sdk(gateway, api_key="wrong").models.list()
    for key in ("env-key-123", "file-key-456"):
        answer = await fleet.sdk(gateway, api_key=key).completions.create(
            model=fleet.model.name, prompt="a", max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(gateway.url + "/healthz").status_code == 200  # probes need no key
    assert "env-key-123" not in gateway.log() and "file-key-456" not in gateway.log()


async def test_metrics_count_requests_ttft_and_errors(fleet: Fleet) -> None:
    await fleet.sdk().models.list()
    text = httpx.get(fleet.gateway.url + "/metrics").text
    assert 'streamer_gateway_requests_total{endpoint="completion",status="200"}' in text
    assert 'streamer_gateway_errors_total{code="model_not_found"}' in text
    assert 'streamer_gateway_ttft_seconds_count{endpoint="chat"}' in text
    assert "streamer_gateway_ready_workers 1.0" in text
    await until(lambda: "streamer_gateway_open_streams 0.0" in httpx.get(
        fleet.gateway.url + "/metrics").text, what="no stream left open")


async def test_cancelling_a_batch(fleet: Fleet) -> None:
    """A cancelled batch ends `cancelled`: its open line cancelled on the worker, an invalid
    line failed at once; both in the error file. (Its full run is tests/test_gateway_batch.py.)"""
    fleet.gate.hold()
    tiny_model = fleet.model
    try:
        line = {"custom_id": "only", "method": "POST", "url": "/v1/completions",
                "body": {"model": tiny_model.name, "prompt": "hi", "max_tokens": 3}}
        bad = {**line, "custom_id": "bad", "body": {"model": tiny_model.name, "prompt": "x",
                                                    "n": 4}}
        upload = await fleet.sdk().files.create(
            file=("in.jsonl", (json.dumps(line) + "\n" + json.dumps(bad)).encode()),
            purpose="batch")
        batch = await fleet.sdk().batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        assert batch.request_counts.failed == 1  # the invalid line ends at once
        cancelling = await fleet.sdk().batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")

        async def state() -> str:
            return (await fleet.sdk().batches.retrieve(batch.id)).status

        for _ in range(1200):
            if await state() == "cancelled":
                break
            await asyncio.sleep(0.1)
        final = await fleet.sdk().batches.retrieve(batch.id)
        assert final.status == "cancelled" and final.request_counts.failed == 2
        errors = (await fleet.sdk().files.content(final.error_file_id)).text
        by_id = {json.loads(x)["custom_id"]: json.loads(x) for x in errors.splitlines()}
        assert by_id["bad"]["error"]["code"] == "unsupported_parameter"
        assert by_id["only"]["response"]["status_code"] == 499
    finally:
        fleet.gate.release()


async def test_no_ready_worker_is_503(kafka_settings: KafkaSettings, fleet: Fleet) -> None:
    lonely = f"g{uuid.uuid4().hex[:10]}"
    await apply_topics(kafka_settings, lonely)
    gateway = fleet.gateways.start(lonely)
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    assert httpx.get(gateway.url + "/readyz").status_code == 503
    with pytest.raises(openai.InternalServerError) as err:
        await fleet.sdk(gateway).chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and err.value.code == "no_worker_ready"
