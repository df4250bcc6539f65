"""The model process (engine/remote.py): the same tokens as the model on a thread, load errors
raised as the engine's own, a dead model process hands its requests to the fleet, and a dead
worker leaves no model process behind."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL_PROCESS, until
from reference import PROMPTS, greedy_text

from streamer.config import EngineConfig
from streamer.engine.engine import Engine
from streamer.engine.sequence import SamplingParams
from streamer.protocol import EventType


def _config(model: Path, **overrides: object) -> EngineConfig:
    base = EngineConfig(model=str(model), devices=("cpu", "cpu"), max_num_seqs=8,
                        max_num_batched_tokens=64, kv_cache_bytes=16 << 20)
    return EngineConfig(**{**base.__dict__, **overrides})


async def _run(engine: Engine, params: list[SamplingParams]) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(PROMPTS[i], params[i], request_id=f"r{i}"):
            tokens += out.token_ids
        return tokens

    return await asyncio.gather(*(one(i) for i in range(len(params))))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_the_model_process_gives_the_tokens_of_the_model_on_a_thread(
    tiny_model: Path,
) -> None:
    """Two stages in the model process, greedy and seeded sampled requests: token for token
    what the same engine computes with its stages on threads; the child is gone after stop."""
    params = [SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=9, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.1, top_p=0.9, seed=7, ignore_eos=True)]
    async with Engine(_config(tiny_model, model_process=False)) as engine:
        assert engine.pipeline is not None and engine.pipeline.pid is None
        expected = await _run(engine, params)
    async with Engine(_config(tiny_model, model_process=True)) as engine:
        assert engine.pipeline is not None
        pid = engine.pipeline.pid
        assert pid is not None and pid != os.getpid() and _alive(pid)
        got = await _run(engine, params)
        busy = engine.stage_busy_seconds()
    assert got == expected
    assert [len(t) for t in got] == [12, 9, 12]
    assert len(busy) == 2 and all(b > 0 for b in busy)  # measured in the model process
    assert not _alive(pid)


async def test_a_load_error_in_the_model_process_is_the_engines_own(tiny_model: Path) -> None:
    """What load_stages raises there (here: a KV budget below one block) is raised by start."""
    with pytest.raises(ValueError, match="holds no block"):
        async with Engine(_config(tiny_model, model_process=True, kv_cache_bytes=1)):
            pass


def _model_pid(worker_log: str) -> int:
    for line in worker_log.splitlines():
        if '"engine_loaded"' in line:
            return int(json.loads(line)["model_process"])
    raise AssertionError("no engine_loaded line")


@pytest.mark.kafka
async def test_a_dead_model_process_hands_its_requests_to_the_fleet(
    start_worker, client, tiny_model, gate,
) -> None:
    """SIGKILL of a worker's model process mid-generation: the worker exits non-zero without
    an outcome for any request, and another worker finishes every one from its progress, with
    transformers' greedy text. SIGKILL of that worker then takes its model process with it."""
    gate.hold()
    first = start_worker("--max-num-seqs", "8", "--progress-tokens", "4", gate=gate,
                         env=DEFAULT_MODEL_PROCESS)
    pid = _model_pid(first.log())
    assert _alive(pid)
    prompts = [PROMPTS[i] + f" #{i}" for i in range(4)]
    handles = [await client.submit(p, max_tokens=24, ignore_eos=True) for p in prompts]
    await until(lambda: all(any(e.type is EventType.QUEUED for e in h.events) for h in handles),
                what="all queued")
    gate.hold_at(8)
    await first.await_for('"test_gate_held"', count=2)  # the first was the hold at 0 tokens
    os.kill(pid, 9)
    code = await asyncio.to_thread(first.process.wait, 120)
    assert code != 0
    log = first.log()
    assert "ModelProcessDied" in log and "request_handed_back" in log
    assert not any(e.type in (EventType.COMPLETED, EventType.FAILED)
                   for h in handles for e in h.events)

    second = start_worker("--max-num-seqs", "8", env=DEFAULT_MODEL_PROCESS)
    results = await asyncio.gather(*(h.result(180) for h in handles))
    expected = await asyncio.to_thread(
        lambda: [greedy_text(tiny_model, p, 24, ignore_eos=True) for p in prompts])
    for result, text in zip(results, expected, strict=True):
        assert result.outcome.type is EventType.COMPLETED and result.outcome.worker == "w1"
        assert result.text == text
        started = [e for e in result.events if e.type is EventType.STARTED]
        assert started[-1].resumed is not None and started[-1].resumed.index >= 4

    orphan = _model_pid(second.log())
    second.kill()  # no orphan: the model process sees its socket close and exits
    await until(lambda: not _alive(orphan), what="the model process exits")
