"""Resumed attempts with real worker processes: a SIGKILLed worker's requests continue on another
worker from their last progress record, a SIGTERM hand-back loses no token, and a plain reading
of the topics (segments of `started.resumed`) gives the uninterrupted text."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict

import pytest
from conftest import partitions_of, until
from kafka_helpers import read_records
from prometheus_client.parser import text_string_to_metric_families
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import Result
from streamer.config import KafkaSettings
from streamer.protocol import EventType, Progress, TokenChunk

pytestmark = pytest.mark.kafka

MAX_TOKENS = 40


async def _records(kafka: KafkaSettings, topic: str) -> list[tuple[str, bytes | None]]:
    return await read_records(kafka, topic, partitions_of(topic))


async def _progress(kafka: KafkaSettings, prefix: str) -> dict[str, Progress | None]:
    """The latest progress entry per request id (None: tombstoned)."""
    latest: dict[str, Progress | None] = {}
    for key, value in await _records(kafka, protocol.progress_topic(prefix)):
        latest[key] = protocol.decode_progress(value) if value is not None else None
    return latest


async def _chunks(kafka: KafkaSettings, prefix: str) -> dict[str, list[TokenChunk]]:
    by_id: dict[str, list[TokenChunk]] = defaultdict(list)
    for _, value in await _records(kafka, protocol.tokens_topic(prefix)):
        chunk = protocol.decode_chunk(value or b"")
        by_id[chunk.request_id].append(chunk)
    return by_id


def _plain_text(result: Result, chunks: list[TokenChunk]) -> str:
    """What a plain Kafka consumer assembles by the rule of docs/protocol.md."""
    started = {e.attempt: e for e in result.events if e.type is EventType.STARTED}
    final = started[result.outcome.attempt]
    ranges = [(s.attempt, s.start, s.end) for s in final.resumed.segments] if final.resumed else []
    ranges.append((result.outcome.attempt, final.resumed.index if final.resumed else 0, 10**9))
    picked = sorted((c for c in chunks for a, lo, hi in ranges
                     if c.attempt == a and lo <= c.index < hi), key=lambda c: c.index)
    return "".join(c.text for c in picked)


async def test_a_killed_workers_requests_resume_from_their_progress(
    start_worker, client, tiny_model, gate, kafka_settings, prefix
) -> None:
    """Held at 10 of 40 tokens with a progress record every 4: SIGKILL, then another worker
    continues each request at its last recorded index. Greedy texts equal transformers', seeded
    sampled ones equal an uninterrupted run, and the tokens generated twice are the same tokens."""
    gate.hold()
    first = start_worker("--max-num-seqs", "16", "--progress-tokens", "4", gate=gate)
    prompts = [PROMPTS[i] + f" #{i}" for i in range(8)]
    sampled = {6: 11, 7: 12}  # request index -> seed
    handles = []
    for i, prompt in enumerate(prompts):
        extra = {"temperature": 1.2, "seed": sampled[i]} if i in sampled else {}
        handles.append(await client.submit(prompt, max_tokens=MAX_TOKENS, ignore_eos=True,
                                           **extra))
    await until(lambda: all(any(e.type is EventType.QUEUED for e in h.events) for h in handles),
                what="all queued")
    gate.hold_at(10)  # one step admits all eight; they hold at 10 of their 40 tokens

    for _ in range(600):  # the timeout only catches a hang
        found = await _progress(kafka_settings, prefix)
        entries = [found.get(h.request_id) for h in handles]
        # A record is due once 4 tokens are unrecorded, at a chunk's arrival; chunks may carry
        # several tokens, so the last record before the hold at 10 covers 7 to 10 of them.
        if all(e is not None and len(e.token_ids) >= 7 for e in entries):
            break
        await asyncio.sleep(0.2)
    else:
        raise TimeoutError("progress of 7 tokens was not recorded for every request: "
                           f"{[None if e is None else len(e.token_ids) for e in entries]}")
    first.kill()
    at_kill = await _progress(kafka_settings, prefix)
    second = start_worker("--max-num-seqs", "16")
    results = await asyncio.gather(*(h.result(180) for h in handles))
    chunks = await _chunks(kafka_settings, prefix)

    expected = await asyncio.to_thread(
        lambda: [greedy_text(tiny_model, p, MAX_TOKENS, ignore_eos=True) for p in prompts])
    regenerated = 0
    for i, (handle, result) in enumerate(zip(handles, results, strict=True)):
        assert result.outcome.type is EventType.COMPLETED and result.outcome.worker == "w1"
        assert len(result.token_ids) == MAX_TOKENS
        if i not in sampled:
            assert result.text == expected[i]
        assert _plain_text(result, chunks[handle.request_id]) == result.text
        started = [e for e in result.events if e.type is EventType.STARTED]
        assert [e.worker for e in started] == ["w0", "w1"]
        progress = at_kill[handle.request_id]
        assert progress is not None and started[-1].resumed is not None
        first_attempt = started[0].attempt
        assert started[-1].resumed.attempt == first_attempt
        assert started[-1].resumed.index == len(progress.token_ids)  # the last record
        assert [(s.attempt, s.start, s.end) for s in started[-1].resumed.segments] == [
            (first_attempt, 0, len(progress.token_ids))]
        # w0's chunks past the resume point were generated again by w1: the same tokens.
        old = [(c.index + k, t) for c in chunks[handle.request_id] if c.attempt == first_attempt
               for k, t in enumerate(c.token_ids) if c.index + k >= len(progress.token_ids)]
        assert all(result.token_ids[index] == token for index, token in old)
        regenerated += len(old)
    assert regenerated <= 8 * 3, "at most the 3 tokens past each last record"
    # The new owner counts what it did not have to generate again.
    assert second.metrics_port is not None
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{second.metrics_port}/metrics",
                                     timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert values["streamer_resumed_attempts_total"] == len(handles)
    assert values["streamer_resumed_tokens_total"] == sum(
        len(at_kill[h.request_id].token_ids) for h in handles)
    # Seeded sampling continued exactly: the same requests again, uninterrupted, on w1.
    for i, seed in sampled.items():
        again = await client.submit(prompts[i], max_tokens=MAX_TOKENS, ignore_eos=True,
                                    temperature=1.2, seed=seed)
        assert (await again.result(120)).text == results[i].text
    # Every finished request's progress entry is gone (tombstoned after its outcome).
    after = await _progress(kafka_settings, prefix)
    assert all(after.get(h.request_id) is None for h in handles)


async def test_a_sigterm_hand_back_loses_no_token(start_worker, client, tiny_model, gate,
                                                  kafka_settings, prefix) -> None:
    """Held at 5 tokens past the grace period: the worker records everything acknowledged as it
    hands the requests back, and the next owner resumes each at index 5 exactly."""
    gate.hold()
    worker = start_worker("--shutdown-grace-s", "0.5", "--max-num-seqs", "2",
                          "--progress-tokens", "1000", "--progress-s", "1000", gate=gate)
    handles = [await client.submit(p, max_tokens=MAX_TOKENS, ignore_eos=True)
               for p in PROMPTS[:4]]
    await until(lambda: all(any(e.type is EventType.QUEUED for e in h.events) for h in handles),
                what="all queued")
    gate.hold_at(5)  # one step admits two; they hold at 5 tokens
    await until(lambda: sum(1 for h in handles if any(
        e.type is EventType.STARTED for e in h.events)) == 2, what="2 running")
    assert worker.terminate(timeout=60) == 0
    start_worker()
    results = await asyncio.gather(*(h.result(120) for h in handles))
    expected = await asyncio.to_thread(
        lambda: [greedy_text(tiny_model, p, MAX_TOKENS, ignore_eos=True) for p in PROMPTS[:4]])
    assert [r.text for r in results] == expected
    resumed = [e.resumed for r in results for e in r.events
               if e.type is EventType.STARTED and e.resumed is not None]
    assert len(resumed) == 2 and all(r.index == 5 for r in resumed)
    chunks = await _chunks(kafka_settings, prefix)
    revoked = {r.attempt for r in resumed}
    assert max(c.index + len(c.token_ids) for cs in chunks.values() for c in cs
               if c.attempt in revoked) == 5, "nothing past the hand-back point was published"


async def test_a_rolling_restart_loses_nothing(start_worker, client, tiny_model, gate,
                                               kafka_settings, prefix) -> None:
    """Two workers replaced one at a time while every request is mid-generation: each old worker
    hands its requests back with their progress, the new ones continue them, and every text is
    exact. No request starts over."""
    gate.hold()
    # Both join the group's first generation together (one join, not a join and a rebalance).
    old = [start_worker("--shutdown-grace-s", "0.5", "--progress-tokens", "1000",
                        "--progress-s", "1000", gate=gate, wait=False) for _ in range(2)]
    for worker in old:
        await worker.await_for("partitions_assigned")
    prompts = [PROMPTS[i] + f" r{i}" for i in range(12)]
    handles = [await client.submit(p, max_tokens=MAX_TOKENS, ignore_eos=True) for p in prompts]
    await until(lambda: all(any(e.type is EventType.QUEUED for e in h.events) for h in handles),
                what="all queued")
    gate.hold_at(4)  # every request starts and holds at 4 tokens
    await until(lambda: all(any(e.type is EventType.STARTED for e in h.events) for h in handles),
                what="all running")
    for worker in old:  # replace one worker at a time, as a Deployment's rolling update does
        start_worker()
        assert worker.terminate(timeout=60) == 0
    results = await asyncio.gather(*(h.result(180) for h in handles))
    expected = await asyncio.to_thread(
        lambda: [greedy_text(tiny_model, p, MAX_TOKENS, ignore_eos=True) for p in prompts])
    assert [r.text for r in results] == expected
    for result in results:
        assert result.outcome.worker in ("w2", "w3")
        final = next(e for e in result.events if e.type is EventType.STARTED
                     and e.attempt == result.outcome.attempt)
        assert final.resumed is not None and final.resumed.index >= 4, "continued, not restarted"
