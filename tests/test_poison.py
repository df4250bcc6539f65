"""Poison pills against a two-worker fleet: real records, real broker, real model folders.

Each bad record ends with a terminal event or a DLQ copy; no worker exits; every valid request is
served with the reference text; committed offsets reach the end of every request partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka_helpers import committed_reaches_end
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import StreamerClient
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka

# Mistral-Instruct style: roles must alternate user/assistant, else the template raises.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

BAD_HEADER_PRODUCER = '''
import asyncio, sys
from aiokafka import AIOKafkaProducer

class RawKey(str):
    def encode(self, *args, **kwargs):  # the pure-Python record builder writes these bytes
        return b"bad-\\xff\\xfe-key"

async def main(bootstrap, topic, partition):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    md = await producer.send_and_wait(topic, b'{"id": "poison", "prompt": "x"}', key=b"poison",
                                      headers=[(RawKey("k"), b"v")], partition=int(partition))
    print(md.offset)
    await producer.stop()

asyncio.run(main(*sys.argv[1:]))
'''


@pytest.fixture(scope="session")
def strict_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return path


def produce_undecodable_header(bootstrap: str, topic: str, partition: int) -> int:
    """A record whose header key is not UTF-8; aiokafka's own builder cannot write one, so the
    pure-Python builder is used with a key whose bytes are chosen."""
    out = subprocess.run(
        [sys.executable, "-c", BAD_HEADER_PRODUCER, bootstrap, topic, str(partition)],
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}, capture_output=True, text=True,
        timeout=60, check=True,
    )
    return int(out.stdout.strip())


async def read_dlq(kafka_settings, prefix: str, expect: int, timeout: float = 60) -> list:  # type: ignore[no-untyped-def]
    consumer = AIOKafkaConsumer(protocol.dlq_topic(prefix), **kafka_settings.client_kwargs(),
                                group_id=None, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4_000_000)
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_two_workers_survive_every_poison_pill(
    start_worker, client, kafka_settings, kafka_bootstrap, prefix, strict_model
) -> None:
    # Both join the group's first generation together (one join, not a join and a rebalance).
    workers = [start_worker(model=strict_model, wait=False) for _ in range(2)]
    for worker in workers:
        await worker.await_for("partitions_assigned")
    normal = protocol.request_topic(prefix, "normal")
    follow = {rid: await client.follow(rid) for rid in
              ("chat-bad", "chat-ok", "big-header", "long-trace", "after-0", "after-1")}

    # 1. A chat request the model's template refuses (roles do not alternate).
    await client.produce_raw(json.dumps({"id": "chat-bad", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode())
    await client.produce_raw(json.dumps({"id": "chat-ok", "max_tokens": 6, "messages": [
        {"role": "user", "content": "a"}]}).encode())
    # 3. Headers that make the record larger than max_message_bytes: a DLQ copy that fits.
    await client.produce_raw(b'{"id": "huge-headers", "prompt": "x"}', key=b"huge",
                             headers=[("x-a", b"a" * 700_000), ("x-b", b"b" * 500_000)])
    # 4. An oversized traceparent: served, and not copied to the outputs.
    await client.produce_raw(b'{"id": "long-trace", "prompt": "The cat", "max_tokens": 4}',
                             headers=[("traceparent", b"00-" + b"f" * 100_000)])
    # 5. A record the Kafka client cannot decode, followed by valid ones on the same partition.
    bad_offset = produce_undecodable_header(kafka_bootstrap, normal, 0)
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs(), enable_idempotence=False)
    await producer.start()
    try:
        # 2. A 600 KB protocol header: rejected, and the rejection does not echo it.
        await producer.send_and_wait(protocol.request_topic(prefix, "high"),
                                     b'{"id": "big-header", "prompt": "x"}',
                                     headers=[("streamer-protocol", b"9" * 600_000)])
        for i in range(2):
            await producer.send_and_wait(normal, json.dumps(
                {"id": f"after-{i}", "prompt": PROMPTS[i], "max_tokens": 8}).encode(), partition=0)
    finally:
        await producer.stop()
    valid = [(p, await client.submit(p, max_tokens=8)) for p in PROMPTS[:6]]

    for prompt, handle in valid:
        result = await handle.result(180)
        assert result.outcome.type is EventType.COMPLETED
        assert result.text == greedy_text(strict_model, prompt, 8)
    outcomes = {rid: (await h.result(180)) for rid, h in follow.items()}
    bad = outcomes["chat-bad"].outcome
    assert bad.type is EventType.REJECTED and bad.error.code == "invalid_request"
    assert "roles must alternate" in bad.error.message
    assert outcomes["chat-ok"].outcome.type is EventType.COMPLETED
    big = outcomes["big-header"].outcome
    assert big.type is EventType.REJECTED and big.error.code == "unsupported_protocol"
    assert len(big.error.message) < 1000
    assert outcomes["long-trace"].outcome.type is EventType.COMPLETED
    for i in range(2):
        after = outcomes[f"after-{i}"]
        assert after.outcome.type is EventType.COMPLETED
        assert after.text == greedy_text(strict_model, PROMPTS[i], 8)

    dead = await read_dlq(kafka_settings, prefix, expect=2)
    by_error = {dict(r.headers)["dlq-error"]: r for r in dead}
    stub = by_error[b"undecodable"]
    assert stub.value is None
    assert dict(stub.headers)["dlq-source-offset"] == str(bad_offset).encode()
    assert dict(stub.headers)["dlq-source-topic"] == normal.encode()
    huge = by_error[b"message_too_large"]
    assert huge.key == b"huge" and "x-a" not in dict(huge.headers)
    assert int(dict(huge.headers)["dlq-headers-dropped"]) == 4  # with produce_raw's two

    assert await committed_reaches_end(kafka_settings, prefix) == {}
    for worker in workers:
        assert worker.process.poll() is None, worker.log()[-2000:]
        assert "traceparent" not in worker.log() or "f" * 1000 not in worker.log()
        assert "task_failed" not in worker.log()


async def test_the_control_listener_survives_bad_records_and_is_supervised(
    kafka_settings, kafka_bootstrap, prefix, tiny_model
) -> None:
    from streamer.config import EngineConfig, WorkerConfig
    from streamer.worker import Worker

    config = WorkerConfig(engine=EngineConfig(model=str(tiny_model), kv_cache_bytes=64 << 20),
                          kafka=kafka_settings, prefix=prefix, metrics_port=0, worker_id="ctl")
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    control = protocol.control_topic(prefix)
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs(), enable_idempotence=False)
    await producer.start()
    try:
        deadline = time.monotonic() + 90
        while not worker.ready()[0]:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.1)
        for value in (b"\xff\xfe", b'{"type": "cancel"}', b"[" * 50_000, b'{"type": "pause"}'):
            await producer.send_and_wait(control, value, key=b"junk", partition=0)
        await asyncio.to_thread(produce_undecodable_header, kafka_bootstrap, control, 0)
        cancel = protocol.ControlMessage(type="cancel", request_id="c1")
        await producer.send_and_wait(control, protocol.encode(cancel), key=b"c1", partition=0)
        while "c1" not in worker.control.cancels:  # read past every bad record
            assert time.monotonic() < deadline + 60 and worker.control.alive
            await asyncio.sleep(0.05)
        assert worker.control.skipped >= 5
        async with StreamerClient(kafka_settings, prefix) as client:
            handle = await client.submit("cancelled before it arrived", request_id="c1")
            assert (await handle.result(60)).outcome.type is EventType.CANCELLED
        assert worker.healthy() == (True, "ok")

        assert worker.control._task is not None
        worker.control._task.cancel()  # the listener dies: liveness says so
        with contextlib.suppress(asyncio.CancelledError):
            await worker.control._task
        ok, reason = worker.healthy()
        assert not ok and "control listener" in reason
    finally:
        await producer.stop()
        worker.request_stop()
        await asyncio.wait_for(task, 60)
