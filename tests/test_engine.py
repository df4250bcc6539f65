"""The engine in-process against transformers' generate(), on real model folders."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from reference import PROMPTS, greedy, max_tokens_for

from streamer.config import EngineConfig
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams


async def _run(engine: Engine, prompt: str, params: SamplingParams, delay: float = 0.0,
               request_id: str | None = None) -> tuple[list[int], str, object]:
    await asyncio.sleep(delay)
    tokens: list[int] = []
    text = ""
    final = None
    async for out in engine.generate(prompt, params, request_id=request_id):
        if out.kind is OutputKind.TOKENS:
            assert out.index == len(tokens), "chunks arrive in index order, none repeated"
            tokens += out.token_ids
            text += out.text
        elif out.kind is OutputKind.FINISHED:
            final = out
    return tokens, text, final


def _engine(model: Path, devices: str = "cpu", **overrides: object) -> Engine:
    config = EngineConfig(model=str(model), devices=tuple(devices.split(",")), max_num_seqs=16,
                          max_num_batched_tokens=96, kv_cache_bytes=128 << 20)
    return Engine(EngineConfig(**{**config.__dict__, **overrides}))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu", "cpu,cpu,cpu"])
async def test_greedy_matches_transformers(make_model, arch: str, devices: str) -> None:
    """32 concurrent requests, mixed prompt and output lengths, staggered arrivals."""
    model = make_model(arch)
    expected = [greedy(model, p, max_tokens_for(i)) for i, p in enumerate(PROMPTS)]
    async with _engine(model, devices) as engine:
        results = await asyncio.gather(*(
            _run(engine, p, SamplingParams(max_tokens=max_tokens_for(i)), delay=0.003 * (i % 9))
            for i, p in enumerate(PROMPTS)))
        assert engine.num_requests == 0
        assert engine.scheduler is not None and engine.scheduler.slots_in_use() == 0
        busy = engine.stage_busy_seconds()
    assert len(busy) == len(devices.split(",")) and all(b > 0 for b in busy)
    for i, (tokens, text, final) in enumerate(results):
        assert tokens == expected[i], f"request {i} differs from transformers"
        assert text == final.final_text  # streamed deltas concatenate to the final text
        assert final.num_completion_tokens == len(tokens)


async def test_chunked_prefill_gives_the_same_tokens(tiny_model: Path) -> None:
    long_prompt = " ".join(PROMPTS[:6])  # ~60+ tokens, budget 8 per step forces many chunks
    expected = greedy(tiny_model, long_prompt, 20)
    async with _engine(tiny_model, max_num_batched_tokens=8, max_num_seqs=4) as engine:
        tokens, _, final = await _run(engine, long_prompt, SamplingParams(max_tokens=20))
    assert tokens == expected
    assert final.finish_reason in ("length", "eos")


async def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model: Path) -> None:
    params = SamplingParams(temperature=4.0, top_p=0.98, top_k=200, seed=1234, max_tokens=24,
                            ignore_eos=True)
    async with _engine(tiny_model) as engine:
        alone, _, _ = await _run(engine, PROMPTS[0], params)
        crowd = await asyncio.gather(
            _run(engine, PROMPTS[0], params),
            *(_run(engine, p, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
              for p in PROMPTS[1:12]))
        other_seed, _, _ = await _run(engine, PROMPTS[0],
                                      SamplingParams(**{**params.__dict__, "seed": 99}))
    assert crowd[0][0] == alone
    assert other_seed != alone


async def test_stop_string_truncates_and_reports_stop(tiny_model: Path) -> None:
    async with _engine(tiny_model) as engine:
        tokens, text, final = await _run(engine, PROMPTS[3], SamplingParams(max_tokens=40,
                                                                            ignore_eos=True))
        full = final.final_text
        assert len(full) > 12
        stop = full[8:11]
        head = full[: full.index(stop)]
        _, stopped_text, stopped = await _run(
            engine, PROMPTS[3], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.final_text == head == stopped_text


async def test_abort_frees_the_slot_and_finishes_the_stream(tiny_model: Path) -> None:
    async with _engine(tiny_model) as engine:
        task = asyncio.create_task(_run(engine, PROMPTS[1], SamplingParams(max_tokens=500,
                                                                           ignore_eos=True),
                                        request_id="long"))
        while not engine.has_request("long") or engine.steps < 5:
            await asyncio.sleep(0.01)
        assert engine.abort("long", "cancelled")
        tokens, _, final = await asyncio.wait_for(task, 10)
        assert final.finish_reason == "cancelled"
        assert len(tokens) < 500
        assert engine.scheduler is not None and engine.scheduler.slots_in_use() == 0
        assert not engine.abort("long")  # unknown now


async def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        from streamer.engine.model import load_model

        load_model(str(tmp_path), __import__("torch").float32)
