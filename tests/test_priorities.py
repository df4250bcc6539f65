"""Priority lanes, preemption, cancellation, deadlines and backpressure through a real broker.

Nothing here depends on how fast the machine is. The worker's engine runs behind the test gate
(docs/testing.md) where a test needs it "still running when X happens": the gate holds the engine
before a step or at a token count, and the test checks order from the event stream.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
from conftest import partition_of, partitions_of, until
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import RequestHandle
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka


def _has(handle: RequestHandle, kind: EventType) -> bool:
    return any(e.type is kind for e in handle.events)


async def _tokens_received(handle: RequestHandle, count: int) -> None:
    """Follow the handle's live text until `count` tokens have arrived."""
    received = 0
    async for update in handle.updates():
        if update.kind == "text":
            received += update.tokens
            if received >= count:
                return
    raise AssertionError(f"{handle.request_id} ended after {received} of {count} tokens")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))  # type: ignore[union-attr]


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    raise KeyError(name)


async def test_urgent_requests_overtake_a_low_priority_flood(start_worker, client, gate) -> None:
    """Urgent requests arrive while low ones hold every slot and more wait: they preempt, run
    and finish while no low request can finish (the gate keeps lows short of their length)."""
    gate.hold()
    start_worker("--max-num-seqs", "8", "--lane-capacity", "16", gate=gate)
    flood = [await client.submit(PROMPTS[i % len(PROMPTS)] + f" #{i}", priority="low",
                                 max_tokens=48, ignore_eos=True) for i in range(40)]
    await until(lambda: sum(_has(h, EventType.QUEUED) for h in flood) >= 8, what="8 lows queued")
    gate.hold_at(4)  # the first step admits 8 lows: every slot is taken
    await until(lambda: sum(_has(h, EventType.STARTED) for h in flood) == 8, what="8 lows running")
    urgent = [await client.submit(PROMPTS[i], priority="urgent", max_tokens=8) for i in range(3)]
    await until(lambda: all(_has(h, EventType.QUEUED) for h in urgent), what="urgent queued")
    gate.hold_at(40)  # lows may now run to 40 of their 48 tokens, never to the end
    results = await asyncio.gather(*(h.result(120) for h in urgent))
    assert all(r.outcome.type is EventType.COMPLETED for r in results)
    assert not any(h.done for h in flood), "every urgent request finished before any low one"
    gate.release()
    flood_results = await asyncio.gather(*(h.result(600) for h in flood))
    assert all(r.outcome.type is EventType.COMPLETED for r in flood_results)
    # Each urgent request found all 8 slots taken by lows and preempted one.
    assert sum(e.type is EventType.PREEMPTED for r in flood_results for e in r.events) >= 3
    print("\nurgent e2e ms:", [r.outcome.timings.e2e_ms for r in results if r.outcome.timings])


async def test_preempted_request_resumes_with_identical_text(
    start_worker, client, tiny_model, gate
) -> None:
    gate.hold()
    start_worker("--max-num-seqs", "2", gate=gate)
    # 80 tokens: the preemption comes at the first step after the hold at 10, so lows need no
    # more length than that to be running when the urgent request arrives.
    lows = [await client.submit(PROMPTS[i], priority="low", max_tokens=80, ignore_eos=True)
            for i in range(2)]
    await until(lambda: all(_has(h, EventType.QUEUED) for h in lows), what="lows queued")
    gate.hold_at(10)  # both run (one step admits both), then hold mid-generation
    await until(lambda: all(_has(h, EventType.STARTED) for h in lows), what="lows running")
    urgent = await client.submit(PROMPTS[5], priority="urgent", max_tokens=20, ignore_eos=True)
    await until(lambda: _has(urgent, EventType.QUEUED), what="urgent queued")
    gate.release()  # the next step finds both slots taken by lows: the urgent one preempts one
    results = await asyncio.gather(*(h.result(180) for h in [*lows, urgent]))
    preempted = [r for r in results[:2] if any(e.type is EventType.PREEMPTED for e in r.events)]
    assert len(preempted) == 1, "the urgent request must preempt one of the low ones"
    expected = await asyncio.to_thread(
        lambda: [greedy_text(tiny_model, PROMPTS[i], 80, ignore_eos=True) for i in range(2)])
    for i, result in enumerate(results[:2]):
        assert result.text == expected[i]
        assert result.attempts_seen == 1  # preemption keeps the attempt
        assert lows[i].duplicate_chunks == 0  # no token index emitted twice
    assert results[2].outcome.type is EventType.COMPLETED


# Cancels and deadlines need a default worker behind the gate and nothing of their own: they share
# one (conftest `shared`), with fresh request ids each.


async def test_cancel_stops_a_long_request_and_the_worker_keeps_serving(
    shared, shared_client
) -> None:
    client, gate = shared_client, shared.gate
    gate.hold_at(3)  # the long request holds at 3 tokens: the cancel finds it mid-generation
    long = await client.submit(PROMPTS[0], max_tokens=900, ignore_eos=True)
    await _tokens_received(long, 3)
    await client.cancel(long.request_id)
    result = await long.result(60)
    assert result.outcome.type is EventType.CANCELLED
    assert len(result.token_ids) == 3
    gate.release()
    after = await client.submit(PROMPTS[1], max_tokens=6)
    assert (await after.result(60)).outcome.type is EventType.COMPLETED


async def test_cancel_before_the_request_arrives(shared, shared_client) -> None:
    """A cancel the worker consumed before its request never lets the request reach the engine.

    "Consumed before" is an observed fact, not a sleep: a sentinel request waits in the held
    engine, and its cancel follows ours on the same control partition; the worker handles a
    partition in order, so once the sentinel is cancelled, ours has been read."""
    client, gate, prefix = shared_client, shared.gate, shared.prefix
    gate.hold()
    control = protocol.control_topic(prefix)
    partitions = partitions_of(control)
    ours = "cancel-first"
    sentinel = next(f"sentinel-{n}" for n in range(10_000)
                    if partition_of(f"sentinel-{n}", partitions) == partition_of(ours, partitions))
    waiting = await client.submit(PROMPTS[0], request_id=sentinel, max_tokens=4)
    await until(lambda: _has(waiting, EventType.QUEUED), what="sentinel queued")

    async def cancel(request_id: str) -> int:
        message = protocol.ControlMessage(type="cancel", request_id=request_id)
        sent = await client._producer.send_and_wait(control, protocol.encode(message),
                                                    key=request_id.encode())
        return int(sent.partition)

    assert await cancel(ours) == await cancel(sentinel)  # one partition: read in this order
    assert (await waiting.result(60)).outcome.type is EventType.CANCELLED
    handle = await client.submit(PROMPTS[2], request_id=ours, max_tokens=20)
    result = await handle.result(60)
    assert result.outcome.type is EventType.CANCELLED
    assert result.token_ids == []
    # Only the outcome: never queued in the engine, never started.
    assert [e.type for e in result.events] == [EventType.CANCELLED]


async def test_deadlines(shared, shared_client) -> None:
    """A request past its deadline on arrival expires at once; one that passes its deadline while
    running (held at 2 tokens by the gate, however fast the machine) expires with those tokens.

    The one wall-clock bound: the worker must produce 2 tokens within the 3 s deadline."""
    client, gate = shared_client, shared.gate
    gate.hold_at(2)
    past = await client.submit(PROMPTS[0], max_tokens=20, deadline_ms=protocol.now_ms() - 1000)
    soon = await client.submit(PROMPTS[1], max_tokens=900, ignore_eos=True,
                               deadline_ms=protocol.now_ms() + 3000)
    expired_at_once = await past.result(60)
    assert expired_at_once.outcome.type is EventType.EXPIRED
    assert expired_at_once.token_ids == []
    assert [e.type for e in expired_at_once.events] == [EventType.EXPIRED]
    await _tokens_received(soon, 2)
    running = await soon.result(60)
    assert running.outcome.type is EventType.EXPIRED
    assert len(running.token_ids) == 2
    assert _has(soon, EventType.STARTED)


async def test_paused_lane_keeps_the_backlog_in_kafka(start_worker, client, gate) -> None:
    """With the engine held, intake fills the low lane to its capacity (plus at most one fetch
    batch), pauses it, and the rest of the flood stays in Kafka, not in the worker's memory."""
    gate.hold()
    worker = start_worker("--max-num-seqs", "2", "--lane-capacity", "4", gate=gate)
    port = worker.metrics_port
    assert port is not None
    flood = [await client.submit(f"backlog {i} " + PROMPTS[i % 8], priority="low", max_tokens=32,
                                 ignore_eos=True, metadata={"pad": "x" * 2000})
             for i in range(400)]
    await worker.await_for("lane_paused", 60)
    rss_before = _rss_kib(worker.process.pid)
    waiting = []
    for _ in range(5):  # the bound holds at every instant; a few samples while intake polls on
        waiting.append(_metric(port, 'streamer_num_requests_waiting{priority="low"}'))
        await asyncio.sleep(0.2)
    rss_after = _rss_kib(worker.process.pid)
    print(f"\nwaiting samples {waiting}; RSS {rss_before} -> {rss_after} KiB")
    assert all(4 <= w <= 4 + 64 for w in waiting)
    assert not any(h.done for h in flood)  # held: nothing was served, so nothing committed
    assert rss_after - rss_before < 100_000
    # Held and paused, the consumed requests are exactly the waiting ones: all announced queued.
    await until(lambda: sum(_has(h, EventType.QUEUED) for h in flood) == waiting[-1],
                what="a queued event for each waiting request")
    queued = [h for h in flood if _has(h, EventType.QUEUED)]
    gate.release()
    for handle in queued[:8]:
        assert (await handle.result(120)).outcome.type is EventType.COMPLETED
