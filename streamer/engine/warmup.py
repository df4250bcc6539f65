"""Warm-up: run the step shapes a worker will use before it turns ready, so the first request
does not pay one-time costs (allocator growth, kernel and primitive selection, lazy imports in the
model code, the sampler's and tokenizer's first calls, and with `--compile` the compilation).

It runs through the real pipeline (each stage on its own thread, in the model process when
there is one) but outside the scheduler and the `BlockManager`: the blocks it writes are never
registered under a prefix hash, so no request can ever match them, and they are zeroed
afterwards. Nothing is published; the worker joins its consumer group (so `/readyz` can turn
ready) only after this returns.

`--compile` wraps each stage's decoder layers with torch.compile (dynamic shapes). A compile
error is caught here: the layers go back to eager and the worker runs uncompiled, with an error
logged, never a crash. Dynamo's own fallback (suppress_errors) covers later recompiles.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from streamer.engine.sampling import sample, token_seed
from streamer.engine.sequence import SamplingParams
from streamer.engine.shell import decoder_layers
from streamer.engine.stages import Pipeline, Stage, StepBatch

if TYPE_CHECKING:
    from streamer.engine.engine import Engine

log = structlog.get_logger(__name__)

_GREEDY = SamplingParams()
_SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=0)


@dataclass(frozen=True)
class WarmupPlan:
    """The steps to run: single prefills of these lengths, then decode steps of these sizes."""

    prefill_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]


def plan(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, num_blocks: int,
         block_size: int) -> WarmupPlan:
    """A short and the longest prefill chunk a step can hold, and decode batches of 1, 2, 4, ...
    up to max_num_seqs (pure)."""
    longest = max(1, min(max_num_batched_tokens, max_model_len - 1, num_blocks * block_size))
    prefills = tuple(sorted({min(16, longest), longest}))
    most = max(1, min(max_num_seqs, max_num_batched_tokens))
    sizes, n = [], 1
    while n < most:
        sizes.append(n)
        n *= 2
    return WarmupPlan(prefills, (*sizes, most))


def batches(p: WarmupPlan, num_blocks: int, block_size: int, vocab: int) -> list[StepBatch]:
    """The plan's steps. Token ids are arbitrary: nothing of them outlives the warm-up."""
    steps = []
    for n in p.prefill_lens:
        table = [i % num_blocks for i in range(-(-n // block_size))]
        steps.append(_batch([(n, n)], [table], vocab))
    # Each sequence decodes one token in a block of its own (shared once the blocks run out).
    steps += [_batch([(1, 1)] * size, [[i % num_blocks] for i in range(size)], vocab)
              for size in p.decode_batches]
    return steps


def _batch(lens: list[tuple[int, int]], tables: list[list[int]], vocab: int) -> StepBatch:
    total = sum(q for q, _ in lens)
    rows = torch.cumsum(torch.tensor([q for q, _ in lens]), 0) - 1
    # Greedy rows and one seeded sampled row: both sampler paths run.
    params = [_SAMPLED if i == 0 and len(lens) > 1 else _GREEDY for i in range(len(lens))]
    seeds = [token_seed(0, 0) if not p.greedy else None for p in params]
    return StepBatch(
        input_ids=torch.arange(total, dtype=torch.long) % vocab,
        query_lens=[q for q, _ in lens],
        context_lens=[c for _, c in lens],
        block_tables=tables,
        sample_rows=rows,
        sampler=functools.partial(sample, params=params, seeds=seeds),  # picklable
    )


async def warm_up(pipeline: Pipeline, steps: list[StepBatch]) -> None:
    """Run `steps` through the pipeline one at a time; raise the first step error."""
    for step in steps:
        await pipeline.submit(step)
        _, result = await pipeline.result()
        if isinstance(result, BaseException):
            raise result


def clear(stages: list[Stage], steps: list[StepBatch]) -> None:
    """Zero every block the warm-up wrote, in every stage's pool."""
    used = sorted({b for s in steps for table in s.block_tables for b in table})
    index = torch.tensor(used, dtype=torch.long)
    for stage in stages:
        assert stage.pool is not None
        for tensor in (*stage.pool.k, *stage.pool.v):
            tensor.index_fill_(0, index.to(tensor.device), 0)


def compile_stages(stages: list[Stage]) -> list[Any]:
    """torch.compile each stage's own decoder layers in place; returns them (for `uncompile`)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a failing recompile later runs eagerly
    compiled = []
    for stage in stages:
        _, layers = decoder_layers(stage.shell.model)
        for i in stage.layer_range:
            layers[i].compile(dynamic=True)
            compiled.append(layers[i])
    return compiled


def uncompile(layers: list[Any]) -> None:
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile set: back to eager


def log_done(began: float, p: WarmupPlan, compiled: bool) -> float:
    seconds = round(time.perf_counter() - began, 3)
    log.info("warmup_done", duration_s=seconds, prefill_lens=list(p.prefill_lens),
             decode_batches=list(p.decode_batches), compiled=compiled)
    return seconds


async def run(engine: Engine) -> float | None:
    """The engine's warm-up (and compile), between loading and its first step; its duration in
    seconds, None when off."""
    cfg = engine.config
    assert engine.pipeline is not None and engine.blocks is not None and engine.shape is not None
    if not cfg.warmup:
        if cfg.compile:
            await engine.pipeline.warm([], compile=True)
        return None
    engine.warming = True
    began = time.perf_counter()
    blocks = engine.blocks
    p = plan(cfg.max_num_batched_tokens, cfg.max_num_seqs, engine.max_model_len,
             blocks.num_blocks, blocks.block_size)
    steps = batches(p, blocks.num_blocks, blocks.block_size, engine.shape.vocab_size)
    try:
        await asyncio.to_thread(_host_side, engine.tokenizer)
        compiled = await engine.pipeline.warm(steps, compile=cfg.compile)
    finally:
        engine.warming = False
    return log_done(began, p, compiled)


async def warm_stages(pipeline: Pipeline, steps: list[StepBatch], compile: bool) -> bool:
    """The model side, where the stages live: compile, run `steps`, zero what they wrote.
    A compiled warm-up that fails runs again eagerly. Returns whether the stages compiled."""
    compiled = compile_stages(pipeline.stages) if compile else []
    if not steps:
        return bool(compiled)
    try:
        await warm_up(pipeline, steps)
    except Exception as exc:
        if not compiled:
            raise
        log.error("compile_failed", error=repr(exc)[:300], note="running uncompiled (eager)")
        uncompile(compiled)
        compiled = []
        await warm_up(pipeline, steps)
    clear(pipeline.stages, steps)
    return bool(compiled)


def _host_side(tokenizer: Any) -> None:
    """First calls of the tokenizer, the chat template and the detokenizer."""
    from streamer.engine.detokenizer import IncrementalDetokenizer

    ids = list(tokenizer("warm up").input_ids)
    if getattr(tokenizer, "chat_template", None):
        tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}],
                                      add_generation_prompt=True, tokenize=False)
    IncrementalDetokenizer(tokenizer).push(ids)
