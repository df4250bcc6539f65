"""The engine in-process against transformers' generate(), on real model folders."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import Gate, until
from reference import PROMPTS, greedy, max_tokens_for

from streamer.config import EngineConfig
from streamer.engine.engine import Engine
from streamer.engine.gate import GateRule, parse_rule
from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream
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
        assert engine.blocks is not None and engine.blocks.stats.used_blocks == 0
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


def _drain(stream: RequestStream) -> list[RequestOutput]:
    """Outputs already on a stream, without waiting."""
    outputs = []
    while stream._pending:
        outputs.append(stream._pending.popleft())
    return outputs


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs if o.kind is OutputKind.TOKENS for t in o.token_ids]


async def _finished(stream: RequestStream) -> tuple[list[RequestOutput], RequestOutput]:
    outputs = [out async for out in stream]
    assert outputs[-1].kind is OutputKind.FINISHED
    return outputs, outputs[-1]


async def test_abort_frees_the_slot_and_finishes_the_stream(tiny_model: Path, gate: Gate) -> None:
    gate.hold_at(5)
    async with _engine(tiny_model, test_gate=str(gate.path)) as engine:
        ids = engine.tokenizer(PROMPTS[1]).input_ids
        stream = engine.add("long", ids, SamplingParams(max_tokens=500, ignore_eos=True))
        await until(lambda: engine.gate_held and engine.num_requests == 1)
        assert engine.abort("long", "cancelled")
        outputs, final = await _finished(stream)
        assert final.finish_reason == "cancelled"
        assert len(_tokens(outputs)) == 5 == final.num_completion_tokens
        assert engine.blocks is not None and engine.blocks.stats.used_blocks == 0
        assert not engine.abort("long")  # unknown now


# ------------------------------------------------------------------------------ the test gate


def test_gate_rules_parse() -> None:
    assert parse_rule("") == parse_rule(" \n") == GateRule()
    assert parse_rule("tokens=7\n") == GateRule(tokens=7)
    assert GateRule().holds(0) and GateRule(tokens=3).holds(3)
    assert not GateRule(tokens=3).holds(2)
    for bad in ("tokens=0", "tokens=x", "steps=3", "hold"):
        with pytest.raises(ValueError, match="test gate"):
            parse_rule(bad)


async def test_gate_holds_mid_generation_and_the_output_is_unchanged(
    tiny_model: Path, gate: Gate
) -> None:
    """tokens=N holds at exactly N tokens; a later rule moves the hold; removal runs to the end."""
    expected = greedy(tiny_model, PROMPTS[2], 30, ignore_eos=True)
    gate.hold_at(4)
    async with _engine(tiny_model, devices="cpu,cpu", test_gate=str(gate.path)) as engine:
        ids = engine.tokenizer(PROMPTS[2]).input_ids
        stream = engine.add("r", ids, SamplingParams(max_tokens=30, ignore_eos=True))
        other = engine.add("short", ids[:3], SamplingParams(max_tokens=2, ignore_eos=True))
        await until(lambda: engine.gate_held)
        seen = _drain(stream)
        assert _tokens(seen) == expected[:4]
        # A request that finishes below N leaves the engine and does not count.
        short_outputs, short_final = await _finished(other)
        assert short_final.finish_reason == "length" and len(_tokens(short_outputs)) == 2
        gate.hold_at(11)

        def held_at_11() -> bool:
            seen.extend(_drain(stream))
            # More than 4 tokens means the engine read the new rule (and reset gate_held) first.
            return engine.gate_held and len(_tokens(seen)) == 11

        await until(held_at_11)
        assert _tokens(seen) == expected[:11]
        gate.release()
        rest, final = await _finished(stream)
    assert _tokens(seen + rest) == expected
    assert final.finish_reason == "length" and final.num_completion_tokens == 30


async def test_a_held_engine_still_expires_and_aborts(tiny_model: Path, gate: Gate) -> None:
    """Held before anything starts: deadlines and aborts still end requests, none is started."""
    gate.hold()
    async with _engine(tiny_model, test_gate=str(gate.path)) as engine:
        await until(lambda: engine.gate_held)
        ids = engine.tokenizer(PROMPTS[0]).input_ids
        expired = engine.add("late", ids, SamplingParams(max_tokens=8),
                             deadline_ms=int(time.time() * 1000) - 1)
        waiting = engine.add("waiting", ids, SamplingParams(max_tokens=8))
        outputs, final = await _finished(expired)
        assert [o.kind for o in outputs] == [OutputKind.FINISHED]
        assert final.finish_reason == "expired"
        assert engine.abort("waiting", "cancelled")
        outputs, final = await _finished(waiting)
        assert [o.kind for o in outputs] == [OutputKind.FINISHED]
        assert final.finish_reason == "cancelled"
        assert engine.steps == 0


async def test_an_unreadable_gate_stops_the_engine_loudly(tiny_model: Path, gate: Gate) -> None:
    gate.path.write_text("tokens=soon")
    engine = await _engine(tiny_model, test_gate=str(gate.path)).start()
    try:
        await until(lambda: engine.fatal is not None)
        assert "test gate" in str(engine.fatal)
        with pytest.raises(RuntimeError, match="fatal"):
            engine.add("r", [1, 2], SamplingParams(max_tokens=2))
    finally:
        with pytest.raises(ValueError, match="test gate"):  # stop() re-raises the loop's error
            await engine.stop()


# --------------------------------------------------------------------- failed steps and aborts


def _blocking_fault(
    engine: Engine,
) -> tuple[threading.Event, threading.Event, list[list[int]]]:
    """The first forward of stage 0 waits for `release`, then raises; later ones run normally
    and their input ids are recorded."""
    assert engine.pipeline is not None
    stage = engine.pipeline.stages[0]
    real_forward = stage.forward
    entered, release = threading.Event(), threading.Event()
    later: list[list[int]] = []

    def forward(batch, hidden):  # type: ignore[no-untyped-def]
        if not entered.is_set():
            entered.set()
            release.wait(60)
            raise RuntimeError("injected fault")
        later.append(batch.input_ids.tolist())
        return real_forward(batch, hidden)

    stage.forward = forward  # type: ignore[method-assign]
    return entered, release, later


@pytest.mark.parametrize("company", [0, 1], ids=["alone", "with-another-request"])
async def test_a_failed_step_honours_a_pending_abort(tiny_model: Path, company: int) -> None:
    """Aborted while its step runs, then the step fails: it ends with the abort's reason.

    Alone, the failure is final; with company, the step is retried one sequence at a time and
    the aborted sequence is not retried."""
    async with _engine(tiny_model) as engine:
        entered, release, later = _blocking_fault(engine)
        ids = engine.tokenizer(PROMPTS[4]).input_ids
        # Added in one go, so both are in the first step.
        victim = engine.add("victim", ids, SamplingParams(max_tokens=6))
        others = [engine.add(f"other{i}", engine.tokenizer(PROMPTS[5]).input_ids,
                             SamplingParams(max_tokens=6)) for i in range(company)]
        try:
            await asyncio.to_thread(entered.wait, 60)
            assert engine.abort("victim", "revoked")  # in flight: pending until the step ends
        finally:
            release.set()
        outputs, final = await _finished(victim)
        assert final.finish_reason == "revoked" and final.error is None
        assert _tokens(outputs) == []
        for stream in others:
            _, other = await _finished(stream)
            assert other.finish_reason in ("length", "eos") and other.error is None
        assert engine.fatal is None and engine.num_requests == 0
    assert ids not in later  # the retry in smaller steps did not run the aborted sequence again


async def test_a_failed_step_without_an_abort_fails_its_request(tiny_model: Path) -> None:
    async with _engine(tiny_model) as engine:
        entered, release, _ = _blocking_fault(engine)
        release.set()
        stream = engine.add("r", engine.tokenizer(PROMPTS[4]).input_ids,
                            SamplingParams(max_tokens=6))
        _, final = await _finished(stream)
        assert entered.is_set()
        assert final.finish_reason == "failed" and "injected fault" in (final.error or "")


# ------------------------------------------------------------------------------ paged KV cache


async def test_kv_blocks_grow_with_the_sequence(tiny_model: Path) -> None:
    held: list[int] = []
    async with _engine(tiny_model, block_size=4) as engine:
        assert engine.blocks is not None
        blocks = engine.blocks
        engine.on_step = lambda plan, _: held.append(
            len(blocks.block_table("grow")) if blocks.has("grow") else 0)
        ids = engine.tokenizer(PROMPTS[2]).input_ids
        stream = engine.add("grow", ids, SamplingParams(max_tokens=20, ignore_eos=True))
        _, final = await _finished(stream)
        assert final.num_completion_tokens == 20
        assert blocks.stats.used_blocks == 0 and engine.kv_usage == 0.0
    live = [n for n in held if n]
    assert live == sorted(live), "a running sequence never gives blocks back"
    assert live[0] == -(-len(ids) // 4)  # the prompt's blocks, not a max_model_len reservation
    assert live[-1] == -(-(len(ids) + 19) // 4)  # the last sampled token needs no slot


@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu"])
async def test_prefix_caching_skips_a_shared_prompt_prefix(tiny_model: Path, devices: str) -> None:
    shared = " ".join(PROMPTS[:4])
    prompts = [shared + " and then the cat slept", shared + " while the robot sang"]
    expected = [greedy(tiny_model, p, 12) for p in prompts]
    async with _engine(tiny_model, devices, block_size=4) as engine:
        assert engine.blocks is not None
        first, _, _ = await _run(engine, prompts[0], SamplingParams(max_tokens=12))
        before = engine.blocks.stats.hit_tokens
        second, _, _ = await _run(engine, prompts[1], SamplingParams(max_tokens=12))
        hits = engine.blocks.stats.hit_tokens - before
    assert hits >= 16, hits  # the shared prompt's full blocks were not recomputed
    assert [first, second] == expected


async def test_request_larger_than_the_whole_kv_cache_is_refused(tiny_model: Path) -> None:
    from streamer.engine.limits import LimitError
    from streamer.protocol import ErrorCode

    async with _engine(tiny_model, block_size=4, kv_cache_bytes=1 << 16) as engine:
        assert engine.blocks is not None
        capacity = engine.blocks.num_blocks * 4
        with pytest.raises(LimitError, match="KV blocks") as info:
            engine.add("big", [1] * 8, SamplingParams(max_tokens=capacity))
        assert info.value.code is ErrorCode.KV_BUDGET_EXCEEDED
        tokens, _, final = await _run(engine, PROMPTS[0], SamplingParams(max_tokens=4))
        assert final.num_completion_tokens == len(tokens) == 4 or final.finish_reason == "eos"
