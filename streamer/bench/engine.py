"""`streamer bench engine`: the engine against its ceiling and two baselines, in one process.

Same model, same seeded workload, one after the other in one run: (a) the raw forward-loop
ceiling, (b) the engine in-process, (c) static micro-batching with `generate()`, (d) transformers'
continuous batching. Also `python -m streamer.bench.engine [flags]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.bench import plots, report
from streamer.bench.ceiling import run_ceiling
from streamer.bench.hf_cb import run_hf_continuous
from streamer.bench.inprocess import engine_config, run_engine
from streamer.bench.results import SystemResult, machine_info
from streamer.bench.scenarios import scenario_data
from streamer.bench.static import run_static
from streamer.bench.stats import aggregate
from streamer.bench.suite import (
    BenchOptions,
    ceiling_shape,
    kv_budget,
    load_hf_model,
    load_workload,
    run_rounds,
)
from streamer.bench.workload import Workload

ENGINE_RATIOS = ("engine/static", "engine/ceiling", "engine/hf_cb")
ENGINE_TARGETS = ("engine/ceiling", "kv_tokens_per_gib", "prefix_ttft_ratio", "engine/static",
                  "engine/hf_cb")
ENGINE_ORDER = ("ceiling", "engine", "static", "hf_cb")


def inprocess_runners(options: BenchOptions, workload: Workload, tokenizer: Any
                      ) -> dict[str, Callable[[], SystemResult]]:
    """One thunk per in-process system (ceiling, engine, static, hf_cb), sharing one HF model."""
    model = load_hf_model(options.model)
    prompt_len, steps = ceiling_shape(workload)
    config = engine_config(options.model, **options.engine_args())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "ceiling": lambda: run_ceiling(model, prompt_len=prompt_len, steps=steps,
                                       batch_sizes=options.ceiling_batches,
                                       seed=options.workload.seed),
        "engine": lambda: asyncio.run(run_engine(config, workload)),
        "static": lambda: run_static(model, workload, pad_id=pad, max_batch=options.static_batch,
                                     window_s=options.static_window_s),
        "hf_cb": lambda: run_hf_continuous(model, workload, kv_cache_bytes=kv_budget(options),
                                           max_batch_tokens=options.max_num_batched_tokens,
                                           max_requests=options.max_num_seqs),
    }


def engine_markdown(data: dict[str, Any], systems: list[SystemResult]) -> str:
    engine = data["systems"]["engine"]
    parts = [
        "# streamer bench engine",
        "",
        f"Model `{data['model']}`, {data['workload']['num_requests']} requests "
        f"({data['workload_totals']['requested_tokens']} requested tokens, "
        f"{data['workload_totals']['prompt_tokens']} prompt tokens), seed "
        f"{data['workload']['seed']}; {data['machine']['cpu_count']} CPUs, torch "
        f"{data['machine']['torch']} ({data['machine']['torch_threads']} threads), transformers "
        f"{data['machine']['transformers']}.",
        "",
        "## Targets",
        "",
        report.targets_table(data["targets"]),
        "",
        "## Useful tokens/s",
        "",
        report.systems_table(systems),
        "",
        report.ratios_table(data["ratios"]),
        "",
        report.hf_cache_note(data),
        "",
        report.ceiling_note(data),
    ]
    parts += report.scenario_sections(data, engine.get("details", {}))
    if data.get("engine_latency"):
        parts += ["", "## Engine latency (in-process, all requests at once)", "",
                  report.latency_table({"engine": data["engine_latency"]})]
    if data.get("plots"):
        parts += ["", "Plots: " + ", ".join(f"`{p}`" for p in data["plots"])]
    return "\n".join(parts)


def run_engine_bench(options: BenchOptions, out_dir: Path, log: Callable[[str], None] = print
                     ) -> int:
    workload, tokenizer = load_workload(options)
    log(f"workload: {len(workload.requests)} requests, {workload.requested_tokens} requested "
        f"tokens, {workload.prompt_tokens} prompt tokens")
    runners = inprocess_runners(options, workload, tokenizer)
    systems = run_rounds(runners, ENGINE_ORDER, options.repeat, log, options.systems)
    ordered = [systems[name] for name in ENGINE_ORDER]
    data: dict[str, Any] = {
        "benchmark": "engine", "machine": machine_info(), "model": options.model,
        "config": options.to_json(), "workload": options.workload.to_json(),
        "workload_totals": {"requested_tokens": workload.requested_tokens,
                            "prompt_tokens": workload.prompt_tokens},
        "seed": options.workload.seed,
        "systems": {s.name: s.to_json() for s in ordered},
        "ratios": report.ratios(systems, ENGINE_RATIOS),
    }
    data.update(scenario_data(options, workload, tokenizer, data["ratios"], ENGINE_TARGETS, log))
    engine = systems["engine"]
    if engine.ok:
        data["engine_latency"] = aggregate(engine.timings, engine.wall_s).to_json()
    data["plots"] = [p.name for p in plots.scenario_plots(out_dir, "engine", data["scenarios"])]
    for path in report.write_results(out_dir, "engine", data, engine_markdown(data, ordered)):
        log(f"wrote {path}")
    return 0 if engine.ok else 1


def main(argv: list[str] | None = None) -> int:
    from streamer.bench.cli import add_engine_arguments

    parser = argparse.ArgumentParser(prog="python -m streamer.bench.engine", description=__doc__)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
