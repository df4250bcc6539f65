"""Hostile input, model faults, out-of-memory and leaks, against a real broker and real models."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import time
from collections import Counter

import pytest
import torch
from aiokafka import AIOKafkaConsumer
from conftest import until
from reference import PROMPTS, greedy_text

from streamer.client import StreamerClient
from streamer.config import EngineConfig, WorkerConfig
from streamer.protocol import EventType
from streamer.worker import Worker

pytestmark = pytest.mark.kafka


def _rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))  # type: ignore[union-attr]


def hostile_messages(count: int, seed: int = 7) -> list[tuple[bytes, str]]:
    """(value, expected) pairs: expected is 'dlq' or 'rejected'. Deterministic for a seed."""
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    makers = [
        lambda i: (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), "dlq"),
        lambda i: (b"[" * 20_000 + b"]" * 20_000, "dlq"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x", "metadata": _deep(60)}).encode(),
                   "rejected"),
        lambda i: (b'{"id": "h%d", "prompt": "' % i + b"a" * 1_100_000 + b'"}', "dlq"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": 42}).encode(), "rejected"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x", "max_tokens": 10**12}).encode(),
                   "rejected"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x", "stop": ["s"] * 3000}).encode(),
                   "rejected"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x",
                               "metadata": {"blob": "m" * 50_000}}).encode(), "rejected"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x", "temperature": "hot"}).encode(),
                   "rejected"),
        lambda i: (json.dumps({"id": f"h{i}", "messages": [{"role": "user"}]}).encode(),
                   "rejected"),
        lambda i: (json.dumps({"id": f"h{i}"}).encode(), "rejected"),
        lambda i: (json.dumps({"id": i, "prompt": "numeric id"}).encode(), "dlq"),
        lambda i: (json.dumps({"id": "\ud800" * 3, "prompt": "lone surrogates"},
                              ensure_ascii=False).encode("utf-8", "surrogatepass"), "dlq"),
        lambda i: (b'{"id": "h%d", "prompt": "x", "top_k": 1e400}' % i, "dlq"),
        lambda i: (b"null", "dlq"),
        lambda i: (b"", "dlq"),
        lambda i: (json.dumps({"id": f"h{i}", "prompt": "x", "seed": 2**70}).encode(),
                   "rejected"),
    ]
    for i in range(count):
        out.append(makers[i % len(makers)](i))
    return out


def _deep(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


VALID_UNICODE = ["naïve café ☕", "日本語のテキスト", "emoji 👩‍👩‍👧‍👦 family", "combining e\u0301",
                 "rtl שלום", "zero\u200bwidth"]


async def test_a_thousand_hostile_messages_never_hurt_the_worker(
    start_worker, client, kafka_settings, prefix, tiny_model
) -> None:
    worker = start_worker()
    pid = worker.process.pid
    rss_before = _rss_kib(pid)
    bad = hostile_messages(1020)
    valid = []
    for i, (value, _) in enumerate(bad):
        await client.produce_raw(value, priority=("urgent", "high", "normal", "low")[i % 4],
                                 key=b"hostile")
        if i % 50 == 0:
            prompt = VALID_UNICODE[(i // 50) % len(VALID_UNICODE)] + " " + PROMPTS[i % 8]
            valid.append((prompt, await client.submit(prompt, max_tokens=12)))
    results = [await h.result(300) for _, h in valid]
    for (prompt, _), result in zip(valid, results, strict=True):
        assert result.outcome.type is EventType.COMPLETED
        assert result.text == greedy_text(tiny_model, prompt, 12)

    expected = Counter(kind for _, kind in bad)
    seen = await _outcomes(kafka_settings, prefix, expected, timeout=120)
    rss_after = _rss_kib(pid)
    print(f"\nsent {len(bad)} hostile messages ({dict(expected)}) and {len(valid)} valid requests;"
          f" observed {dict(seen)}; worker RSS {rss_before} -> {rss_after} KiB")
    assert seen == expected
    assert worker.process.poll() is None, "the worker never restarts"
    assert "engine_loop_failed" not in worker.log() and "task_failed" not in worker.log()
    assert rss_after - rss_before < 300_000  # KiB; 1 MB messages were read, none were kept


async def _outcomes(kafka_settings, prefix: str, expected: Counter, timeout: float) -> Counter:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(f"{prefix}.requests.dlq", f"{prefix}.events",
                                **kafka_settings.client_kwargs(), group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=2_000_000)
    await consumer.start()
    seen: Counter = Counter()  # type: ignore[type-arg]
    try:
        deadline = time.monotonic() + timeout
        while seen != expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    if record.topic.endswith(".dlq"):
                        seen["dlq"] += record.key == b"hostile"
                    elif json.loads(record.value)["type"] == "rejected":
                        seen["rejected"] += 1
    finally:
        await consumer.stop()
    return seen


async def _in_process_worker(kafka_settings, prefix, tiny_model, worker_options=None, **engine) -> tuple[Worker, asyncio.Task]:  # type: ignore[no-untyped-def]
    config = WorkerConfig(
        # Stages on threads: these tests replace a stage's forward to inject faults.
        engine=EngineConfig(model=str(tiny_model), kv_cache_bytes=64 << 20, model_process=False,
                            **engine),
        kafka=kafka_settings, prefix=prefix, metrics_port=0, worker_id="inproc",
        **(worker_options or {}))
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 60
    while not worker.ready()[0]:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.1)
    return worker, task


async def _stop(worker: Worker, task: asyncio.Task) -> None:  # type: ignore[type-arg]
    worker.request_stop()
    await asyncio.wait_for(task, 60)


async def test_a_model_fault_fails_only_its_request_and_out_of_memory_shrinks_the_batch(
    kafka_settings, prefix, tiny_model
) -> None:
    """One worker for both halves (a worker start costs more than the checks), each with its own
    fault in the stage's forward: 1. a model fault fails only the request that triggers it;
    2. out-of-memory shrinks the batch and retries, and every request completes."""
    worker, task = await _in_process_worker(kafka_settings, prefix, tiny_model)
    poison = worker.engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stage = worker.engine.pipeline.stages[0]
    real_forward = stage.forward

    def faulty_forward(batch, hidden):  # type: ignore[no-untyped-def]
        if bool((batch.input_ids == poison).any()):
            raise RuntimeError("injected fault: poison token in the batch")
        return real_forward(batch, hidden)

    def small_memory_forward(batch, hidden):  # type: ignore[no-untyped-def]
        sequences = len(batch.query_lens)
        if sequences > 3:
            raise torch.OutOfMemoryError("injected: only 3 sequences fit")
        return real_forward(batch, hidden)

    try:
        async with StreamerClient(kafka_settings, prefix) as client:
            # 1. A model fault.
            stage.forward = faulty_forward  # type: ignore[method-assign]
            good = [await client.submit(p, max_tokens=20) for p in PROMPTS[:6]]
            bad = await client.submit("this one is <|endoftext|> poisoned", max_tokens=20)
            more = [await client.submit(p, max_tokens=20) for p in PROMPTS[6:10]]
            bad_result = await bad.result(60)
            results = await asyncio.gather(*(h.result(60) for h in good + more))
            assert bad_result.outcome.type is EventType.FAILED
            assert bad_result.outcome.error.code == "model_error"
            assert "injected fault" in bad_result.outcome.error.message
            for result, prompt in zip(results, PROMPTS[:10], strict=True):
                assert result.outcome.type is EventType.COMPLETED
                assert result.text == greedy_text(tiny_model, prompt, 20)

            # 2. Out of memory above 3 sequences (the engine is idle: every request finished).
            oom_retries = worker.engine.oom_retries
            stage.forward = small_memory_forward  # type: ignore[method-assign]
            handles = [await client.submit(p, max_tokens=24) for p in PROMPTS[:12]]
            results = await asyncio.gather(*(h.result(120) for h in handles))
            assert worker.engine.oom_retries > oom_retries
            for result, prompt in zip(results, PROMPTS[:12], strict=True):
                assert result.outcome.type is EventType.COMPLETED
                assert result.text == greedy_text(tiny_model, prompt, 24)
    finally:
        await _stop(worker, task)


@pytest.mark.slow
async def test_soak_no_leaks(kafka_settings, prefix, tiny_model) -> None:
    """Thousands of requests: RSS stays within a margin; no sequences, slots or tasks leak."""
    worker, task = await _in_process_worker(kafka_settings, prefix, tiny_model, max_num_seqs=32)
    try:
        async with StreamerClient(kafka_settings, prefix) as client:
            async def wave(start: int, n: int) -> None:
                handles = [await client.submit(PROMPTS[(start + i) % len(PROMPTS)],
                                               priority=("urgent", "high", "normal", "low")[i % 4],
                                               max_tokens=4 + i % 12) for i in range(n)]
                results = await asyncio.gather(*(h.result(300) for h in handles))
                assert all(r.outcome.type is EventType.COMPLETED for r in results)

            await wave(0, 300)  # warm-up: allocator and caches settle
            gc.collect()
            rss_before, tasks_before = _rss_kib(), len(asyncio.all_tasks())
            for round_ in range(6):
                await wave(300 * (round_ + 1), 300)
            # Outcomes reach the client before the worker's own bookkeeping ends: wait for the
            # worker to be quiet (an eventual condition), then measure.
            engine = worker.engine
            await until(lambda: engine.num_requests == 0 and not len(worker.intake.flights)
                        and worker.offsets.pending() == 0 and not worker.outcomes.tasks,
                        what="worker quiescent")
            gc.collect()
            rss_after, tasks_after = _rss_kib(), len(asyncio.all_tasks())
        engine = worker.engine
        print(f"\nsoak: 2100 requests; RSS {rss_before} -> {rss_after} KiB; tasks {tasks_before} ->"
              f" {tasks_after}; engine requests {engine.num_requests}; slots in use "
              f"{engine.blocks.stats.used_blocks}; worker in flight {len(worker.intake.flights)}")
        assert engine.num_requests == 0 and engine.blocks.stats.used_blocks == 0
        assert engine.scheduler.num_waiting == 0 and engine.scheduler.num_running == 0
        assert not len(worker.intake.flights)
        assert worker.offsets.pending() == 0
        assert tasks_after <= tasks_before
        assert rss_after - rss_before < 60_000  # KiB
    finally:
        await _stop(worker, task)


async def test_unacknowledged_outputs_pause_intake_without_losing_anything(
    kafka_settings, prefix, tiny_model, gate
) -> None:
    """With a tiny outstanding-output limit the worker keeps pausing intake, and still completes
    every request: output backpressure throttles, it never drops. The gate holds the engine
    until all 16 are queued, so the first step starts all 16 at once: their first-token chunks
    are produced in one event-loop turn, before any acknowledgement can come back (no race
    with the broker's speed)."""
    gate.hold()
    worker, task = await _in_process_worker(kafka_settings, prefix, tiny_model,
                                            worker_options={"max_outstanding_outputs": 4},
                                            test_gate=str(gate.path))
    try:
        async with StreamerClient(kafka_settings, prefix) as client:
            handles = [await client.submit(p, max_tokens=16) for p in PROMPTS[:16]]
            await until(lambda: all(any(e.type is EventType.QUEUED for e in h.events)
                                    for h in handles), what="all queued")
            gate.release()
            results = await asyncio.gather(*(h.result(120) for h in handles))
        assert worker.intake.backpressure.output_pauses > 0
        for result, prompt in zip(results, PROMPTS[:16], strict=True):
            assert result.outcome.type is EventType.COMPLETED
            assert result.text == greedy_text(tiny_model, prompt, 16)
    finally:
        await _stop(worker, task)
