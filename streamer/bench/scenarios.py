"""Engine scenarios besides throughput: the step profile, the shared system prompt, KV capacity.

They run on one engine of their own (same configuration as the measured one), after the
throughput systems, so their hooks and their requests never touch a measured run:
1. the profiling pass: the same workload again with `LayerProfiler` attached (attention vs MLP
   vs the rest, tokens per step); its tokens/s is reported next to the unprofiled figure, as the
   cost of the timers;
2. the prefix scenario (`prefix.py`): TTFT with and without a cached 256-token system prompt.
KV capacity is arithmetic on the model's config (float32, the engine's block size) plus what the
engine actually allocated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from streamer.bench.prefix import PrefixSpec, run_prefix
from streamer.bench.profiler import LayerProfiler
from streamer.bench.workload import Workload
from streamer.config import EngineConfig

GIB = 1 << 30
SCENARIOS = ("profile", "prefix")


def kv_capacity(model: str, block_size: int | None = None) -> dict[str, Any]:
    """Tokens of float32 KV per GiB for `model`, from the engine's cache layout (whole blocks)."""
    import torch

    from streamer.engine.kv.pool import KVLayout
    from streamer.engine.model import load_config

    block_size = block_size or EngineConfig().block_size
    layout = KVLayout.from_config(load_config(model), block_size=block_size, dtype=torch.float32)
    blocks = GIB // layout.bytes_per_block
    return {"dtype": "float32", "block_size": block_size, "layers": len(layout.layers),
            "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "bytes_per_token": layout.bytes_per_block // block_size,
            "blocks_per_gib": blocks, "tokens_per_gib": blocks * block_size}


def engine_kv(engine: Any, workload: Workload | None = None) -> dict[str, Any]:
    """What the engine allocated and how many sequences fit in it."""
    blocks = engine.blocks
    if blocks is None:
        return {}
    tokens = blocks.num_blocks * blocks.block_size
    pools = [getattr(s, "pool", None) for s in engine.pipeline.stages]
    out: dict[str, Any] = {
        "num_blocks": blocks.num_blocks, "block_size": blocks.block_size, "tokens": tokens,
        "bytes": sum(p.nbytes for p in pools if p is not None) or None,
        "max_model_len": engine.max_model_len,
        "full_context_sequences": tokens // engine.max_model_len if engine.max_model_len else None,
    }
    if workload is not None and workload.requests:
        n = len(workload.requests)
        mean = round((workload.prompt_tokens + workload.requested_tokens) / n)
        out["mean_request_tokens"] = mean
        out["mean_requests_that_fit"] = blocks.num_blocks // blocks.blocks_for(mean)
    return out


async def run_engine_scenarios(config: EngineConfig, workload: Workload, tokenizer: Any, *,
                               profile: bool, prefix: PrefixSpec | None) -> dict[str, Any]:
    """One engine: the profiling pass and/or the prefix scenario. Failures are recorded."""
    from streamer.bench.inprocess import drive, warm_up
    from streamer.engine.engine import Engine

    out: dict[str, Any] = {}
    async with Engine(config) as engine:
        out["kv_cache"] = engine_kv(engine, workload)
        await warm_up(engine, workload, 4)
        if profile:
            try:
                profiler = LayerProfiler()
                with profiler.attached(engine):
                    busy = sum(engine.stage_busy_seconds())
                    timings, wall = await drive(engine, workload)
                    stage = sum(engine.stage_busy_seconds()) - busy
                result = profiler.to_json(wall, stage)
                useful = sum(min(t.tokens, t.requested_tokens) for t in timings if t.ok)
                result["useful_tokens_per_s"] = useful / wall if wall > 0 else None
                out["profile"] = result
            except Exception as exc:
                out["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        if prefix is not None:
            try:
                out["prefix"] = await run_prefix(engine, prefix, tokenizer)
            except Exception as exc:
                out["prefix"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def scenario_data(options: Any, workload: Workload, tokenizer: Any,
                  ratios: dict[str, float | None], target_keys: Sequence[str],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """KV capacity, the selected scenarios and the targets table, as result-file sections."""
    from streamer.bench.inprocess import engine_config
    from streamer.bench.targets import evaluate, scenario_figures

    capacity = kv_capacity(options.model)
    log(f"KV capacity: {capacity['tokens_per_gib']:,} float32 tokens per GiB "
        f"({capacity['bytes_per_token']:,} bytes per token)")
    scenarios: dict[str, Any] = {}
    profile, prefix = options.wants("profile"), options.wants("prefix")
    if profile or prefix:
        log(f"running engine scenarios ({', '.join(n for n in SCENARIOS if options.wants(n))}) "
            "...")
        config = engine_config(options.model, **options.engine_args())
        try:
            scenarios = asyncio.run(run_engine_scenarios(
                config, workload, tokenizer, profile=profile,
                prefix=options.prefix if prefix else None))
        except Exception as exc:  # the throughput figures still stand
            scenarios = {"error": f"{type(exc).__name__}: {exc}"}
        _log_scenarios(scenarios, log)
    measured = {**ratios, **scenario_figures(scenarios, capacity)}
    return {"kv_capacity": capacity, "scenarios": scenarios,
            "targets": evaluate(measured, target_keys)}


def _log_scenarios(scenarios: dict[str, Any], log: Callable[[str], None]) -> None:
    if "error" in scenarios:
        log(f"  scenarios failed: {scenarios['error']}")
    prof = scenarios.get("profile")
    if prof and "error" not in prof:
        share = prof["share"]
        log(f"  profile: {prof['steps']} steps, {prof['tokens_per_step']['mean']:.1f} tokens per "
            f"step; attention {100 * share['attention']:.0f}%, MLP {100 * share['mlp']:.0f}%, "
            f"overhead {100 * prof['overhead_share']:.0f}% of the wall time")
    elif prof:
        log(f"  profile failed: {prof['error']}")
    pre = scenarios.get("prefix")
    if pre and "error" not in pre and pre.get("ttft_ratio") is not None:
        log(f"  prefix: TTFT p50 uncached {pre['uncached']['ttft_ms']['p50']:.1f} ms, cached "
            f"{pre['cached']['ttft_ms']['p50']:.1f} ms, ratio {pre['ttft_ratio']:.3f}")
    elif pre:
        log(f"  prefix failed: {pre.get('error')}")
