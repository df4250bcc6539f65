"""Metrics, health, watchdog and logs of real workers on a real broker."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from reference import PROMPTS

from streamer.broker import EmbeddedBroker
from streamer.client import StreamerClient
from streamer.config import EngineConfig, KafkaSettings, WorkerConfig
from streamer.protocol import EventType
from streamer.topics import apply_topics
from streamer.worker import Worker

pytestmark = pytest.mark.kafka


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _sum(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == val for k, val in labels.items()))


def _status(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_metrics_account_for_every_request_and_the_prefix_cache(start_worker, client) -> None:
    """One worker for both halves (a worker start costs more than the checks): 1. every request
    is counted, and logged with its phases; 2. a shared prompt prefix shows in the prefix cache
    metrics, counted from what the first half left."""
    worker = start_worker()
    handles = [await client.submit(p, priority=("urgent", "low")[i % 2], max_tokens=5 + i)
               for i, p in enumerate(PROMPTS[:10])]
    rejected = await client.follow("rej")
    await client.produce_raw(b'{"id": "rej", "prompt": "x", "top_p": 7}', priority="high")
    await client.produce_raw(b"\x00 garbage", priority="high")
    results = await asyncio.gather(*(h.result(120) for h in handles))
    assert (await rejected.result(120)).outcome.type is EventType.REJECTED
    port = worker.metrics_port
    assert port is not None
    # Outcomes are counted once acknowledged, which the client may see first: wait until every
    # outcome is counted (an eventual condition), then check each count exactly.
    def counted() -> list | None:  # type: ignore[type-arg]
        samples = _samples(port)
        done = (_sum(samples, "streamer_requests_total", outcome="completed") >= 10
                and _sum(samples, "streamer_requests_total", outcome="rejected") >= 1
                and _sum(samples, "streamer_requests_total", outcome="dlq") >= 1
                and _sum(samples, "streamer_num_requests_running") == 0
                and any(n == "streamer_consumer_lag" for n, _ in samples))
        return samples if done else None
    samples = await _wait(counted, timeout=60)
    completed = [r for r in results if r.outcome.type is EventType.COMPLETED]
    assert _sum(samples, "streamer_requests_total", outcome="completed") == len(completed) == 10
    assert _sum(samples, "streamer_requests_total", outcome="rejected", priority="high") == 1
    assert _sum(samples, "streamer_requests_total", outcome="dlq", priority="high") == 1
    assert _sum(samples, "streamer_generation_tokens_total") == sum(len(r.token_ids) for r in results)
    assert _sum(samples, "streamer_prompt_tokens_total") == sum(
        r.outcome.usage.prompt_tokens for r in completed)
    for lane, count in (("urgent", 5), ("low", 5)):
        assert _sum(samples, "streamer_time_to_first_token_seconds_count", priority=lane) == count
        assert _sum(samples, "streamer_e2e_request_latency_seconds_count", priority=lane) == count
        assert _sum(samples, "streamer_request_queue_time_seconds_count", priority=lane) == count
    # Records produced: queued, started and completed per request, one rejected; one chunk
    # record per chunk the client received; one DLQ copy.
    chunks = sum(len(h._attempts[r.attempt].chunks) for h, r in zip(handles, results, strict=True))
    assert _sum(samples, "streamer_output_records_total", kind="events") == 3 * 10 + 1
    assert _sum(samples, "streamer_output_records_total", kind="tokens") == chunks
    assert _sum(samples, "streamer_output_records_total", kind="dlq") == 1
    assert _sum(samples, "streamer_output_bytes_total", kind="tokens") > 0
    assert _sum(samples, "streamer_batch_size_count") > 0
    assert _sum(samples, "streamer_stage_busy_seconds_total", stage="0") > 0
    assert _sum(samples, "streamer_ready") == 1
    assert _sum(samples, "streamer_num_requests_running") == 0
    assert any(n == "streamer_consumer_lag" for n, _ in samples)
    assert _sum(samples, "process_resident_memory_bytes") > 0
    del rejected

    # Every log line about a request carries request_id, attempt, worker and priority, and the
    # summary line breaks the time down by phase. Prompts are never in the log.
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    finished = [line for line in lines if line.get("event") == "request_finished"]
    assert len(finished) == 10
    for line in finished:
        for key in ("request_id", "attempt", "worker", "priority", "queue_ms", "tokenize_ms",
                    "prefill_ms", "decode_ms", "publish_ms", "e2e_ms"):
            assert line.get(key) is not None, (key, line)
    assert not any(PROMPTS[0] in text for text in worker.log().splitlines())

    # The prefix cache's counters come from the worker's loop: start the second half from a
    # sample that counts every first-half prompt token (an eventual condition).
    first_half = sum(r.outcome.usage.prompt_tokens for r in completed)

    def looked_up() -> dict | None:  # type: ignore[type-arg]
        samples = _samples(port)
        return samples if _sum(samples, "streamer_prefix_cache_queries_total") >= first_half \
            else None
    before = await _wait(looked_up, timeout=60)
    await _prefix_cache_half(client, port, before=before)


async def _prefix_cache_half(client, port: int, before: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
    """Requests that share a long prompt prefix hit the prefix cache, and /metrics says so.

    Counters are taken as increases over `before` (the worker's samples once the first half's
    prompts were counted); gauges are the worker's own."""
    def grown(samples: dict, name: str) -> float:  # type: ignore[type-arg]
        return _sum(samples, name) - _sum(before, name)

    shared = " ".join(PROMPTS[:12])  # ~180 tokens with the tiny model's tokenizer: 11 blocks
    tails = [" and then the cat slept", " while the robot sang", " so Kafka kept it",
             " until the stars faded"]
    # The first request computes the shared blocks; the others are sent once it has finished,
    # so each of them finds those blocks cached, however fast the machine is.
    first = await (await client.submit(shared + tails[0], max_tokens=4)).result(120)
    handles = [await client.submit(shared + tail, max_tokens=4) for tail in tails[1:]]
    results = [first, *await asyncio.gather(*(h.result(120) for h in handles))]
    assert all(r.outcome.type is EventType.COMPLETED for r in results)
    prompt_tokens = sum(r.outcome.usage.prompt_tokens for r in results)

    # The gauges are refreshed by the worker's loop: wait for them to count every prompt.
    def counted() -> dict | None:  # type: ignore[type-arg]
        samples = _samples(port)
        done = (grown(samples, "streamer_prefix_cache_queries_total") >= prompt_tokens
                and _sum(samples, "streamer_num_requests_running") == 0
                and _sum(samples, "streamer_kv_cache_blocks", state="used") == 0)
        return samples if done else None
    samples = await _wait(counted, timeout=60)
    queries = grown(samples, "streamer_prefix_cache_queries_total")
    hits = grown(samples, "streamer_prefix_cache_hits_total")
    assert queries == prompt_tokens  # every prompt token looked up once, on admission
    # Each later request skips at least 10 of the shared prefix's 11 full blocks of 16 tokens.
    assert hits >= 3 * 10 * 16, (hits, queries)
    assert hits % 16 == 0 and hits < queries  # whole blocks, never a whole prompt
    # The ratio is the worker's since its start: both halves.
    assert _sum(samples, "streamer_prefix_cache_hit_ratio") == pytest.approx(
        _sum(samples, "streamer_prefix_cache_hits_total")
        / _sum(samples, "streamer_prefix_cache_queries_total"))
    assert _sum(samples, "streamer_prefix_cache_preempted_queries_total") == 0
    # Finished sequences free their blocks; the shared prefix stays cached for the next one.
    assert _sum(samples, "streamer_kv_cache_blocks", state="cached") >= 11
    assert _sum(samples, "streamer_kv_cache_usage_ratio") == 0
    total = _sum(samples, "streamer_kv_cache_blocks")
    assert total == _sum(samples, "streamer_kv_cache_blocks", state="empty") + _sum(
        samples, "streamer_kv_cache_blocks", state="cached")


async def test_readyz_follows_the_broker(tmp_path: Path, tiny_model: Path) -> None:
    """A worker process on a broker of its own: stop the broker, /readyz fails; restart, it heals."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "worker", "--model", str(tiny_model),
             "--metrics-port", "0", "--bootstrap-servers", broker.bootstrap_servers,
             "--kv-cache-bytes", str(32 << 20)], stdout=out, stderr=subprocess.STDOUT)
    try:
        port = await _wait(lambda: _port_from_log(log_path), timeout=60)
        await _wait(lambda: _status(port, "/readyz") == 200 or None, timeout=60)
        broker.stop()
        await _wait(lambda: _status(port, "/readyz") == 503 or None, timeout=30)
        assert _status(port, "/healthz") == 200  # alive, only not ready
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "broker2.log").start()
        await apply_topics(KafkaSettings(bootstrap_servers=broker.bootstrap_servers))
        await _wait(lambda: _status(port, "/readyz") == 200 or None, timeout=90)
        # And it serves again: nothing crashed, the consumer rejoined the (new, empty) cluster.
        async with StreamerClient(KafkaSettings(bootstrap_servers=broker.bootstrap_servers)) as c:
            handle = await c.submit("after the outage", max_tokens=5)
            assert (await handle.result(120)).outcome.type is EventType.COMPLETED
        assert proc.poll() is None
        outage_logs = log_path.read_text().count("broker_unreachable")
        assert 1 <= outage_logs <= 3  # summarised, not one line per reconnect attempt
    finally:
        proc.kill()
        proc.wait()
        broker.stop()


def _port_from_log(path: Path) -> int | None:
    match = re.search(r'"port": (\d+), "event": "metrics_listening"', path.read_text())
    return int(match.group(1)) if match else None


async def test_watchdog_flags_a_stalled_stage(kafka_settings, prefix, tiny_model) -> None:
    # Stages on threads: the test replaces a stage's forward with a stalled one.
    config = WorkerConfig(engine=EngineConfig(model=str(tiny_model), kv_cache_bytes=32 << 20,
                                              model_process=False),
                          kafka=kafka_settings, prefix=prefix, metrics_port=0,
                          worker_id="stall-probe", stall_timeout_s=1.0)
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    release = threading.Event()
    try:
        await _wait(lambda: worker.ready()[0] or None, timeout=60)
        stage = worker.engine.pipeline.stages[0]
        real_forward = stage.forward

        def stuck_forward(batch, hidden):  # type: ignore[no-untyped-def]
            stage.current = "stuck in an artificial stall"
            release.wait(30)
            return real_forward(batch, hidden)

        stage.forward = stuck_forward  # type: ignore[method-assign]
        port = worker.server.port
        async with StreamerClient(kafka_settings, prefix) as client:
            handle = await client.submit("stall me", max_tokens=3)
            await _wait(lambda: _status(port, "/healthz") == 503 or None, timeout=30)
            assert "no engine step" in (worker.health.stall or "")
            release.set()
            assert (await handle.result(60)).outcome.type is EventType.COMPLETED
            await _wait(lambda: _status(port, "/healthz") == 200 or None, timeout=30)
    finally:
        release.set()
        worker.request_stop()
        await asyncio.wait_for(task, 60)


async def _wait(probe, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"condition not met within {timeout}s")
