"""The result cache through real worker processes, a real broker and a real redis-server.

A hit is served while the engine is held by the test gate: had the engine been asked, the request
could not finish, so a hit that completes proves the engine was not touched."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Gate
from reference import PROMPTS, greedy_text

from streamer.bench.redis_server import RedisServer
from streamer.client import UpdateKind
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka

CHUNKS = ("--chunk-tokens", "3")  # several chunks per request, so their boundaries are checked


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


async def _run(client, prompt: str, **fields):  # type: ignore[no-untyped-def]
    """(result, chunks as (text, token count)) of one request."""
    handle = await client.submit(prompt, **fields)
    result = await handle.result(180)
    chunks = [(u.text, u.tokens) async for u in handle.updates() if u.kind is UpdateKind.TEXT]
    assert result.outcome.type is EventType.COMPLETED, result.outcome
    return result, chunks


def _metric(worker, name: str, level: str) -> float:  # type: ignore[no-untyped-def]
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode()
    line = f'streamer_cache_{name}_total{{level="{level}"}} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


async def test_repeats_are_served_from_l1_then_l2_after_a_restart_then_l3_without_redis(
        start_worker, client, gate: Gate, tiny_model: Path, redis_server: RedisServer,
        tmp_path: Path) -> None:
    flags = ("--cache", "--redis-url", redis_server.url,
             "--cache-l3-path", str(tmp_path / "l3"), *CHUNKS)
    prompt, n = PROMPTS[3], 10
    greedy = {"max_tokens": n, "ignore_eos": True}
    w0 = start_worker(*flags, gate=gate)

    # A miss: computed by the engine, then stored in every level.
    computed, chunks = await _run(client, prompt, **greedy)
    assert computed.text == greedy_text(tiny_model, prompt, n, ignore_eos=True)
    assert computed.outcome.timings is not None and computed.outcome.timings.cache is None
    assert len(chunks) > 1
    await w0.await_for("result_cached", count=1)

    # L1: the same chunks, the same text, without the engine (held).
    gate.hold()
    hit, hit_chunks = await _run(client, prompt, **greedy, metadata={"again": 1})
    assert hit.outcome.timings is not None and hit.outcome.timings.cache == "l1"
    assert hit_chunks == chunks and hit.token_ids == computed.token_ids
    assert hit.text == hit.outcome.text == computed.text
    assert hit.outcome.usage == computed.outcome.usage
    assert hit.outcome.finish_reason == computed.outcome.finish_reason
    assert hit.outcome.metadata == {"again": 1}  # the new request's, not the stored one's
    types = [e.type for e in hit.events]
    assert types[0] is EventType.QUEUED and types[1] is EventType.STARTED
    assert hit.attempt not in (None, computed.attempt)

    # Seeded sampling: the same seed hits, another seed does not.
    gate.release()
    seeded = {"max_tokens": n, "ignore_eos": True, "temperature": 0.9, "top_p": 0.95}
    first, first_chunks = await _run(client, PROMPTS[4], **seeded, seed=7)
    await w0.await_for("result_cached", count=2)
    gate.hold()
    again, again_chunks = await _run(client, PROMPTS[4], **seeded, seed=7)
    assert again.outcome.timings.cache == "l1"  # type: ignore[union-attr]
    assert (again.token_ids, again_chunks) == (first.token_ids, first_chunks)
    gate.release()
    other, _ = await _run(client, PROMPTS[4], **seeded, seed=8)
    assert other.outcome.timings.cache is None  # type: ignore[union-attr]
    # Never cached: an unseeded sampled request, and one that opts out.
    await _run(client, PROMPTS[5], **seeded)
    unseeded, _ = await _run(client, PROMPTS[5], **seeded)
    assert unseeded.outcome.timings.cache is None  # type: ignore[union-attr]
    opted_out, _ = await _run(client, prompt, **greedy, cache=False)
    assert opted_out.outcome.timings.cache is None  # type: ignore[union-attr]
    assert opted_out.text == computed.text
    assert w0.terminate() == 0

    # L2 (Redis) after a restart: a new process, its L1 empty.
    gate.hold()
    w1 = start_worker(*flags, gate=gate)
    from_l2, l2_chunks = await _run(client, prompt, **greedy)
    assert from_l2.outcome.timings.cache == "l2"  # type: ignore[union-attr]
    assert (from_l2.text, l2_chunks) == (computed.text, chunks)
    assert w1.terminate() == 0

    # L3 (disk) with Redis stopped: Redis down is a counted miss, never a failed request.
    redis_server.stop()
    w2 = start_worker(*flags, gate=gate)
    from_l3, l3_chunks = await _run(client, prompt, **greedy)
    assert from_l3.outcome.timings.cache == "l3"  # type: ignore[union-attr]
    assert (from_l3.text, l3_chunks) == (computed.text, chunks)
    assert _metric(w2, "errors", "l2") >= 1 and _metric(w2, "hits", "l3") == 1
    assert "cache_level_failed" in w2.log()
    gate.release()
    assert w2.terminate() == 0
