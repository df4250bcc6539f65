"""Coalesced token chunks through a real broker and worker: exact text, first token at once."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Gate
from reference import PROMPTS, greedy_text

from streamer.client import UpdateKind
from streamer.protocol import EventType

pytestmark = pytest.mark.kafka

# A window no step reaches: chunks then go out by count (4 tokens), so their sizes are known.
BY_COUNT = ("--chunk-ms", "600000", "--chunk-tokens", "4")


async def _chunk_sizes(handle) -> list[int]:  # type: ignore[no-untyped-def]
    return [u.tokens async for u in handle.updates() if u.kind is UpdateKind.TEXT]


async def test_coalesced_chunks_are_exact_and_the_first_token_is_not_held(
        start_worker, client, gate: Gate, tiny_model) -> None:
    """One worker for both halves (a worker start costs more than the checks)."""
    start_worker(*BY_COUNT, gate=gate)
    # 1. Chunk sizes and texts.
    prompts = PROMPTS[:6]
    lengths = [3, 9, 14, 1, 21, 8]
    handles = [await client.submit(p, max_tokens=n, ignore_eos=True)
               for p, n in zip(prompts, lengths, strict=True)]
    sizes = await asyncio.gather(*(_chunk_sizes(h) for h in handles))
    for i, (handle, n) in enumerate(zip(handles, lengths, strict=True)):
        result = await handle.result(120)
        assert result.outcome.type is EventType.COMPLETED
        assert result.text == greedy_text(tiny_model, prompts[i], n, ignore_eos=True)
        assert len(result.token_ids) == n
        # The first token at once, then chunks of at least 4 (the window never passes), the
        # rest flushed before the terminal event. (An engine step can outrun the serving loop,
        # which then receives two tokens as one output, so sizes are bounds, not exact.)
        assert sum(sizes[i]) == n
        assert all(size >= 4 for size in sizes[i][1:-1]), sizes[i]
        assert len(sizes[i]) <= 2 + (n - 1) // 4, sizes[i]

    # 2. The engine is held after one token: the chunk of token 0 must reach the client anyway
    # (a window of ten minutes does not delay a first token).
    gate.hold_at(1)
    handle = await client.submit(PROMPTS[7], max_tokens=6, ignore_eos=True)
    first = await anext(u async for u in handle.updates() if u.kind is UpdateKind.TEXT)
    assert first.tokens == 1
    gate.release()
    result = await handle.result(120)
    assert result.text == greedy_text(tiny_model, PROMPTS[7], 6, ignore_eos=True)
