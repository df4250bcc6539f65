"""Worker processes through a real broker, checked against transformers' own generate()."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from conftest import ROOT
from kafka_helpers import committed_reaches_end
from reference import PROMPTS, greedy_text, max_tokens_for

from streamer import protocol
from streamer.config import KafkaSettings
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka


async def _results(handles, timeout: float = 180):  # type: ignore[no-untyped-def]
    return await asyncio.gather(*(h.result(timeout) for h in handles))


# The tests that need a default worker and nothing of their own share one (conftest `shared`):
# fresh request ids each, on the module's topics.


async def test_serves_all_four_priorities_with_reference_text(shared_client, tiny_model) -> None:
    client = shared_client
    handles, expected = [], []
    for i, prompt in enumerate(PROMPTS[:16]):
        priority = protocol.PRIORITIES[i % 4]
        handles.append(await client.submit(prompt, priority=priority, max_tokens=max_tokens_for(i),
                                           metadata={"n": i}))
        expected.append(greedy_text(tiny_model, prompt, max_tokens_for(i)))
    results = await _results(handles)
    for i, result in enumerate(results):
        outcome = result.outcome
        assert outcome.type is EventType.COMPLETED, outcome
        assert result.text == expected[i] == outcome.text
        assert outcome.priority == protocol.PRIORITIES[i % 4]
        assert outcome.metadata == {"n": i}
        assert outcome.usage is not None and outcome.usage.completion_tokens == len(result.token_ids)
        assert outcome.timings is not None and outcome.timings.e2e_ms >= outcome.timings.queue_ms
        types = [e.type for e in result.events]
        assert types[0] is EventType.QUEUED and EventType.STARTED in types
        assert result.attempts_seen == 1


async def test_messages_use_the_chat_template(shared_client, tiny_model) -> None:
    from transformers import AutoTokenizer

    client = shared_client
    messages = [{"role": "user", "content": "Say something about Kafka."}]
    handle = await client.submit(messages=messages, max_tokens=12, priority="high")
    result = await handle.result(120)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
    from reference import _load

    _, model = _load(str(tiny_model))
    out = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=12,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert result.outcome.type is EventType.COMPLETED
    assert result.text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.outcome.usage.prompt_tokens == ids.shape[1]


async def test_dead_letters_and_rejections(shared, shared_client, kafka_settings) -> None:
    client, prefix = shared_client, shared.prefix
    follow = {rid: await client.follow(rid) for rid in
              ("bad-type", "too-many", "both", "ctx", "ok-after", "dup")}
    garbage = [b"\xff\xfe not json", b"[1,2,3]", b'{"prompt": "no id"}', b'{"id": ""}',
               b"[" * 50_000 + b"]" * 50_000, json.dumps({"id": "x" * 129}).encode()]
    for value in garbage:
        await client.produce_raw(value, priority="low", key=b"garbage")
    await client.produce_raw(b'{"id": "bad-type", "prompt": "hi", "max_tokens": "10"}')
    await client.produce_raw(b'{"id": "too-many", "prompt": "hi", "max_tokens": 100000}')
    await client.produce_raw(b'{"id": "both", "prompt": "hi", "messages": []}')
    await client.produce_raw(json.dumps({"id": "ctx", "prompt": "word " * 200,
                                         "max_tokens": 1000}).encode())
    # The same id twice while the first is still generating: the second record is a dead letter.
    await client.produce_raw(json.dumps({"id": "dup", "prompt": "long one", "max_tokens": 200,
                                         "ignore_eos": True}).encode(), priority="normal")
    await client.produce_raw(json.dumps({"id": "dup", "prompt": "again"}).encode(), priority="high")
    await client.produce_raw(b'{"id": "ok-after", "prompt": "still serving", "max_tokens": 5}')

    outcomes = {rid: (await h.result(120)).outcome for rid, h in follow.items()}
    assert outcomes["bad-type"].type is EventType.REJECTED
    assert outcomes["bad-type"].error.code == "invalid_field"
    assert "max_tokens" in outcomes["bad-type"].error.message
    assert outcomes["too-many"].error.code == "max_tokens_too_large"
    assert outcomes["both"].error.code == "invalid_request"
    assert outcomes["ctx"].error.code == "context_length_exceeded"
    assert outcomes["ok-after"].type is EventType.COMPLETED
    assert outcomes["dup"].type is EventType.COMPLETED

    # This test's dead letters (the garbage by its key, the duplicate by its id): other tests
    # share the worker's DLQ topic.
    dead = await _read_all(kafka_settings, protocol.dlq_topic(prefix), expect=len(garbage) + 1,
                           ours=lambda r: r.key == b"garbage" or b'"id": "dup"' in (r.value or b""))
    errors = sorted(dict(r.headers)["dlq-error"].decode() for r in dead)
    assert errors.count("undecodable") == 2  # bad UTF-8 and the 50,000-deep nesting
    assert errors.count("invalid_id") == 4
    assert "duplicate_id" in errors
    for record in dead:
        headers = dict(record.headers)
        assert headers["dlq-source-topic"].decode().startswith(f"{prefix}.requests.")
        assert int(headers["dlq-source-offset"]) >= 0
    assert {r.value for r in dead if r.key == b"garbage"} <= set(garbage)


async def _read_all(kafka: KafkaSettings, topic: str, expect: int, ours, timeout: float = 30):  # type: ignore[no-untyped-def]
    """The topic's records for which `ours(record)` holds, once `expect` have arrived."""
    consumer = AIOKafkaConsumer(topic, **kafka.client_kwargs(), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    records = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expect and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(r for r in batch if ours(r))
    finally:
        await consumer.stop()
    return records


async def test_plain_aiokafka_client_following_the_protocol_doc(
    shared, kafka_settings, tiny_model
) -> None:
    """Only what docs/protocol.md says: JSON request in, tokens and events out, keyed by id."""
    prefix = shared.prefix
    consumer = AIOKafkaConsumer(f"{prefix}.tokens", f"{prefix}.events", **kafka_settings.client_kwargs(),
                                group_id=None, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs())
    await consumer.start()
    await producer.start()
    ids = {}
    try:
        for i, priority in enumerate(("urgent", "high", "normal", "low")):
            rid = f"plain-{uuid.uuid4().hex[:6]}"
            ids[rid] = (PROMPTS[i], 10 + i)
            body = json.dumps({"id": rid, "prompt": PROMPTS[i], "max_tokens": 10 + i}).encode()
            await producer.send_and_wait(f"{prefix}.requests.{priority}", body, key=rid.encode())
        await producer.send_and_wait(f"{prefix}.requests.normal", b"not json at all", key=b"junk")
        bad = json.dumps({"id": "plain-bad", "prompt": "x", "temperature": -1}).encode()
        await producer.send_and_wait(f"{prefix}.requests.normal", bad, key=b"plain-bad")
        chunks: dict[str, dict[int, dict]] = {rid: {} for rid in ids}
        outcome: dict[str, dict] = {}
        deadline = asyncio.get_running_loop().time() + 120
        while asyncio.get_running_loop().time() < deadline:
            done = [r for r in ids if r in outcome and len(chunks[r]) and sum(
                len(c["token_ids"]) for c in chunks[r].values()
            ) == outcome[r]["usage"]["completion_tokens"]]
            if len(done) == len(ids) and "plain-bad" in outcome:
                break
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                for record in batch:
                    body = json.loads(record.value)
                    headers = dict(record.headers)
                    assert headers["content-type"] == b"application/json"
                    assert headers["streamer-protocol"] == b"1"
                    assert record.key.decode() == headers["request-id"].decode()
                    if record.topic.endswith(".tokens") and body["request_id"] in chunks:
                        chunks[body["request_id"]][body["index"]] = body
                    elif record.topic.endswith(".events") and body["type"] in (
                        "completed", "failed", "rejected", "cancelled", "expired"
                    ):
                        outcome.setdefault(body["request_id"], body)
        for rid, (prompt, max_tokens) in ids.items():
            text = "".join(chunks[rid][i]["text"] for i in sorted(chunks[rid]))
            assert outcome[rid]["type"] == "completed"
            assert text == outcome[rid]["text"] == greedy_text(tiny_model, prompt, max_tokens)
        assert outcome["plain-bad"]["type"] == "rejected"
        assert "temperature" in outcome["plain-bad"]["error"]["message"]
    finally:
        await consumer.stop()
        await producer.stop()


async def test_killed_worker_loses_nothing(start_worker, client, kafka_settings, prefix,
                                           tiny_model, gate) -> None:
    """Offsets are committed only past finished requests: SIGKILL mid-run, restart, all complete.

    The gate holds the first worker once a request has 10 of its 60 tokens, so the kill lands
    mid-run on any machine."""
    gate.hold_at(10)
    first = start_worker("--max-num-seqs", "4", gate=gate)
    handles, expected = [], []
    for i, prompt in enumerate(PROMPTS[:12]):
        handles.append(await client.submit(prompt, priority=protocol.PRIORITIES[i % 4],
                                           max_tokens=60, ignore_eos=True))
        expected.append(greedy_text(tiny_model, prompt, 60, ignore_eos=True))
    await first.await_for("test_gate_held")
    first.kill()
    assert not any(h.done for h in handles)  # held at 10 of 60 tokens
    start_worker()
    results = await _results(handles)
    assert [r.text for r in results] == expected
    assert all(r.outcome.type is EventType.COMPLETED for r in results)
    assert all(r.outcome.worker == "w1" for r in results)
    started_on_first = [r for r in results
                        if any(e.type is EventType.STARTED and e.worker == "w0" for e in r.events)]
    assert started_on_first and all(r.attempts_seen >= 2 for r in started_on_first)
    # Everything finished, so the group's committed offsets reach the end of every partition.
    assert await committed_reaches_end(kafka_settings, prefix) == {}


async def test_two_stage_worker_matches_reference_and_both_stages_work(
    start_worker, client, tiny_model
) -> None:
    worker = start_worker("--devices", "cpu,cpu")
    handles = [await client.submit(p, max_tokens=max_tokens_for(i), priority="high")
               for i, p in enumerate(PROMPTS[:12])]
    results = await _results(handles)
    for i, result in enumerate(results):
        assert result.text == greedy_text(tiny_model, PROMPTS[i], max_tokens_for(i))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode()
    busy = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("streamer_stage_busy_seconds_total{")}
    assert set(busy) == {"0", "1"} and all(v > 0 for v in busy.values()), busy


async def test_submit_command(shared, kafka_bootstrap) -> None:
    prefix = shared.prefix
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer.cli", "submit", "Hello from the command line",
        "--max-tokens", "8", "--priority", "urgent", "--prefix", prefix,
        "--bootstrap-servers", kafka_bootstrap, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    summary = out.decode().strip().splitlines()[-1]
    assert summary.startswith("[completed") and "tokens=8" in summary and "priority=urgent" in summary


def test_protocol_structs_are_what_the_doc_lists() -> None:
    """docs/protocol.md names every field of every wire struct."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for struct in (protocol.GenerationRequest, protocol.TokenChunk, protocol.Event,
                   protocol.ControlMessage, protocol.Usage, protocol.Timings, protocol.ErrorInfo):
        for name in struct.__struct_fields__:
            assert f"`{name}`" in doc, f"{struct.__name__}.{name} is not documented"
    for code in protocol.ErrorCode:
        assert f"`{code}`" in doc, f"error code {code} is not documented"
    assert msgspec.json.decode(protocol.encode(protocol.ControlMessage(type="cancel", request_id="a")))
