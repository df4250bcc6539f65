"""Priority lanes, preemption, cancellation, deadlines and backpressure through a real broker.

No timing thresholds: order-based assertions (urgent work finishes while the flood is still
queued), with the measured latencies printed for the record.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka


async def _ttft(handle) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    async for update in handle.updates():
        if update.kind == "text" and update.text:
            return time.monotonic() - began
    return float("nan")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))  # type: ignore[union-attr]


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    raise KeyError(name)


async def test_urgent_requests_overtake_a_low_priority_flood(start_worker, client) -> None:
    start_worker("--max-num-seqs", "8", "--lane-capacity", "16")
    idle = []
    for i in range(3):
        handle = await client.submit(PROMPTS[i], priority="urgent", max_tokens=8)
        idle.append(await _ttft(handle))
        await handle.result(60)
    flood = [await client.submit(PROMPTS[i % len(PROMPTS)], priority="low", max_tokens=48,
                                 ignore_eos=True) for i in range(160)]
    while not any(h.events for h in flood):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the worker is busy with the flood now
    urgent_ttft, urgent_done_while_flood_left = [], []
    for i in range(3):
        handle = await client.submit(PROMPTS[i], priority="urgent", max_tokens=8)
        urgent_ttft.append(await _ttft(handle))
        result = await handle.result(120)
        assert result.outcome.type is EventType.COMPLETED
        urgent_done_while_flood_left.append(sum(not h.done for h in flood))
    print(f"\nidle urgent TTFT s: {[round(t, 3) for t in idle]}; "
          f"during flood: {[round(t, 3) for t in urgent_ttft]}; "
          f"flood requests still unfinished when each urgent finished: {urgent_done_while_flood_left}")
    # Every urgent request finished while most of the flood was still waiting.
    assert min(urgent_done_while_flood_left) > 100
    results = await asyncio.gather(*(h.result(600) for h in flood))
    assert all(r.outcome.type is EventType.COMPLETED for r in results)
    assert sum(1 for r in results for e in r.events if e.type is EventType.PREEMPTED) >= 1


async def test_preempted_request_resumes_with_identical_text(start_worker, client, tiny_model) -> None:
    start_worker("--max-num-seqs", "2")
    lows = [await client.submit(PROMPTS[i], priority="low", max_tokens=300, ignore_eos=True)
            for i in range(2)]
    while not all(any(e.type is EventType.STARTED for e in h.events) for h in lows):
        await asyncio.sleep(0.01)
    urgent = await client.submit(PROMPTS[5], priority="urgent", max_tokens=20, ignore_eos=True)
    results = await asyncio.gather(*(h.result(180) for h in [*lows, urgent]))
    preempted = [r for r in results[:2] if any(e.type is EventType.PREEMPTED for e in r.events)]
    assert preempted, "the urgent request must preempt one of the low ones"
    for i, result in enumerate(results[:2]):
        assert result.text == greedy_text(tiny_model, PROMPTS[i], 300, ignore_eos=True)
        assert result.attempts_seen == 1  # preemption keeps the attempt
        assert lows[i].duplicate_chunks == 0  # no token index emitted twice
    assert results[2].outcome.type is EventType.COMPLETED


async def test_cancel_stops_a_long_request_and_the_worker_keeps_serving(start_worker, client) -> None:
    start_worker()
    long = await client.submit(PROMPTS[0], max_tokens=900, ignore_eos=True)
    async for update in long.updates():
        if update.kind == "text":
            break
    began = time.monotonic()
    await client.cancel(long.request_id)
    result = await long.result(60)
    print(f"\ncancel -> cancelled event in {time.monotonic() - began:.3f} s")
    assert result.outcome.type is EventType.CANCELLED
    assert len(result.token_ids) < 900
    after = await client.submit(PROMPTS[1], max_tokens=6)
    assert (await after.result(60)).outcome.type is EventType.COMPLETED


async def test_cancel_before_the_request_arrives(start_worker, client) -> None:
    start_worker()
    await client.cancel("cancel-first")
    await asyncio.sleep(1.0)  # the control consumer sees it before the request
    handle = await client.submit(PROMPTS[2], request_id="cancel-first", max_tokens=20)
    result = await handle.result(60)
    assert result.outcome.type is EventType.CANCELLED
    assert result.token_ids == []
    assert EventType.STARTED not in [e.type for e in result.events]


async def test_deadlines(start_worker, client) -> None:
    start_worker()
    past = await client.submit(PROMPTS[0], max_tokens=20, deadline_ms=protocol.now_ms() - 1000)
    soon = await client.submit(PROMPTS[1], max_tokens=900, ignore_eos=True,
                               deadline_ms=protocol.now_ms() + 1500)
    expired_at_once = await past.result(60)
    assert expired_at_once.outcome.type is EventType.EXPIRED
    assert expired_at_once.token_ids == []
    running = await soon.result(60)
    assert running.outcome.type is EventType.EXPIRED
    assert 0 < len(running.token_ids) < 900


async def test_paused_lane_keeps_the_backlog_in_kafka(start_worker, client) -> None:
    worker = start_worker("--max-num-seqs", "2", "--lane-capacity", "4")
    port = worker.metrics_port
    assert port is not None
    flood = [await client.submit(f"backlog {i} " + PROMPTS[i % 8], priority="low", max_tokens=32,
                                 ignore_eos=True, metadata={"pad": "x" * 2000})
             for i in range(400)]
    await worker.await_for("lane_paused", 60)
    rss_before = _rss_kib(worker.process.pid)
    waiting = []
    for _ in range(10):
        waiting.append(_metric(port, 'streamer_num_requests_waiting{priority="low"}'))
        await asyncio.sleep(0.3)
    rss_after = _rss_kib(worker.process.pid)
    unfinished = sum(not h.done for h in flood)
    print(f"\nwaiting samples {waiting}; RSS {rss_before} -> {rss_after} KiB; "
          f"{unfinished} requests still in the topic or in flight")
    # The lane holds at most its capacity plus one fetch batch; the rest waits in Kafka.
    assert max(waiting) <= 4 + 64
    assert unfinished > 300
    assert rss_after - rss_before < 100_000
    for handle in flood[:8]:
        assert (await handle.result(120)).outcome.type is EventType.COMPLETED
