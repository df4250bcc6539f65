"""`streamer bench compare`: the fleet through Kafka against everything else, in one run.

On one model and one seeded workload: (a) the raw forward-loop ceiling, (b) the engine
in-process, (c) one worker behind the embedded broker, driven by `bench serve`'s load generator,
(d) static micro-batching, (e) transformers' continuous batching, and optionally (f) a rate sweep
of the fleet. Writes compare.json, compare.md and PNG plots to the output folder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamer.bench import plots, report
from streamer.bench.engine import run_inprocess_systems
from streamer.bench.local_fleet import local_fleet, worker_args
from streamer.bench.results import SystemResult, machine_info
from streamer.bench.serve import ServeResult, run_load
from streamer.bench.stats import aggregate
from streamer.bench.suite import BenchOptions, load_workload, timed_system, worker_env
from streamer.bench.workload import Workload

COMPARE_RATIOS = ("fleet/static", "fleet/hf_cb", "fleet/engine", "engine/ceiling",
                  "engine/static", "engine/hf_cb")
DEFAULT_SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)


async def run_fleet_phase(options: BenchOptions, workload: Workload, *, slo: dict[str, float],
                          log_dir: Path, sweep_fractions: Sequence[float],
                          log: Callable[[str], None]) -> tuple[SystemResult, ServeResult | None,
                                                               list[dict[str, Any]]]:
    """Start broker + topics + 1 worker, run the offline workload (and the sweep), stop it all."""
    result = SystemResult("fleet", "fleet via Kafka (1 worker)")
    served: ServeResult | None = None
    sweep: list[dict[str, Any]] = []
    args = worker_args(options.model, **options.engine_args())
    try:
        async with local_fleet(args, log_dir=log_dir, env=worker_env(options.threads)) as fleet:
            log(f"  fleet ready (prefix {fleet.prefix}); warming up")
            warm = Workload(workload.spec, tuple(workload.requests[:4]))
            await run_load(fleet.kafka, fleet.prefix, _short(warm), slo=slo)
            served = await run_load(fleet.kafka, fleet.prefix, workload, slo=slo)
            if sweep_fractions and served.overall.request_throughput > 0:
                sweep = await _sweep(fleet.kafka, fleet.prefix, workload, slo,
                                     served.overall.request_throughput, sweep_fractions, log)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if served is not None:
        result.timings = served.timings
        result.wall_s = served.duration_s
        result.useful_tokens = served.overall.useful_tokens
        result.details = {"completed": served.overall.completed, "failures": served.failures,
                          "config": options.engine_args(), "serve": served.to_json()}
        if served.failures and result.error is None:
            result.error = f"requests failed: {served.failures}"
    return result, served, sweep


def _short(workload: Workload) -> Workload:
    """The same requests with 8-token completions (warm-up)."""
    from dataclasses import replace

    return Workload(workload.spec, tuple(replace(r, max_tokens=min(8, r.max_tokens))
                                         for r in workload.requests))


async def _sweep(kafka: Any, prefix: str, workload: Workload, slo: dict[str, float],
                 capacity_rps: float, fractions: Sequence[float],
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Poisson arrivals at fractions of the offline request throughput."""
    points = []
    for fraction in fractions:
        rate = capacity_rps * fraction
        log(f"  sweep: {rate:.2f} req/s ({fraction:g} x offline throughput)")
        served = await run_load(kafka, prefix, workload.with_arrivals(rate, 1.0), slo=slo)
        agg = served.overall
        points.append({
            "fraction": fraction, "rate": rate, "completed": agg.completed,
            "request_throughput": agg.request_throughput,
            "output_tokens_per_s": agg.output_tokens_per_s,
            "goodput": agg.goodput, "slo_attainment": agg.slo_attainment,
            "ttft_p50_ms": 1000 * agg.ttft.p50 if agg.ttft else None,
            "ttft_p99_ms": 1000 * agg.ttft.p99 if agg.ttft else None,
            "tpot_p50_ms": 1000 * agg.tpot.p50 if agg.tpot else None,
            "e2e_p50_ms": 1000 * agg.e2e.p50 if agg.e2e else None,
        })
    return points


def run_compare(options: BenchOptions, out_dir: Path, *, slo: dict[str, float],
                sweep_fractions: Sequence[float] = (), log: Callable[[str], None] = print) -> int:
    began = time.monotonic()
    workload, tokenizer = load_workload(options)
    log(f"workload: {len(workload.requests)} requests, {workload.requested_tokens} requested "
        f"tokens, {workload.prompt_tokens} prompt tokens; model {options.model}")
    fleet_out: dict[str, Any] = {}

    def fleet_between() -> None:
        # Right after the engine, so the two systems compared most closely run back to back.
        def phase() -> SystemResult:
            result, served, sweep = asyncio.run(run_fleet_phase(
                options, workload, slo=slo, log_dir=out_dir / "logs",
                sweep_fractions=sweep_fractions, log=log))
            fleet_out.update(served=served, sweep=sweep)
            return result

        fleet_out["result"] = timed_system("fleet", phase, log)

    systems = run_inprocess_systems(options, workload, tokenizer, log, between=fleet_between)
    systems["fleet"] = fleet_out["result"]
    order = ["ceiling", "engine", "fleet", "static", "hf_cb"]
    ordered = [systems[name] for name in order]
    served: ServeResult | None = fleet_out.get("served")
    sweep: list[dict[str, Any]] = fleet_out.get("sweep", [])

    data: dict[str, Any] = {
        "benchmark": "compare", "machine": machine_info(), "model": options.model,
        "config": options.to_json(), "workload": options.workload.to_json(),
        "workload_totals": {"requested_tokens": workload.requested_tokens,
                            "prompt_tokens": workload.prompt_tokens},
        "seed": options.workload.seed, "slo_ms": {k: v * 1000 for k, v in slo.items()},
        "systems": {s.name: s.to_json() for s in ordered},
        "ratios": report.ratios(systems, COMPARE_RATIOS),
        "sweep": sweep, "total_elapsed_s": time.monotonic() - began,
    }
    engine = systems["engine"]
    if engine.ok:
        data["engine_latency"] = aggregate(engine.timings, engine.wall_s, slo).to_json()
    data["plots"] = [p.name for p in _plots(out_dir, ordered, systems, sweep, data)]
    markdown = compare_markdown(data, ordered, served)
    for path in report.write_results(out_dir, "compare", data, markdown):
        log(f"wrote {path}")
    log(f"done in {data['total_elapsed_s']:.0f} s")
    return 0 if engine.ok and systems["fleet"].ok else 1


def _plots(out_dir: Path, ordered: list[SystemResult], systems: dict[str, SystemResult],
           sweep: list[dict[str, Any]], data: dict[str, Any]) -> list[Path]:
    timed = {name: systems[name].timings for name in ("engine", "fleet", "static")
             if systems[name].ok and systems[name].timings}
    paths = [plots.throughput_bars(
        ordered, out_dir / "compare-throughput.png",
        f"{data['workload']['num_requests']} requests, useful tokens/s")]
    if timed:
        paths.append(plots.latency_cdfs(timed, out_dir / "compare-latency-cdf.png"))
        lanes = {name: t for name, t in timed.items() if name != "static"}
        if lanes:
            paths.append(plots.lane_ttft(lanes, out_dir / "compare-lane-ttft.png"))
    if sweep:
        paths.append(plots.latency_throughput(sweep, out_dir / "compare-sweep.png"))
    return paths


def compare_markdown(data: dict[str, Any], ordered: list[SystemResult],
                     served: ServeResult | None) -> str:
    m, w = data["machine"], data["workload"]
    parts = [
        "# streamer bench compare",
        "",
        f"Model `{data['model']}`; {w['num_requests']} requests, prompts {w['prompt_range']} "
        f"tokens, outputs {w['output_range']} tokens (ignore_eos), lanes {w['mix']}, seed "
        f"{w['seed']}, all sent at once; {data['workload_totals']['requested_tokens']} requested "
        f"tokens. {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}. Engine and worker: "
        f"max_num_seqs={data['config']['max_num_seqs']}, max_num_batched_tokens="
        f"{data['config']['max_num_batched_tokens']}.",
        "",
        "## Useful tokens/s",
        "",
        report.systems_table(ordered),
        "",
        report.ratios_table(data["ratios"]),
    ]
    if served is not None:
        groups = {"fleet: all": served.overall.to_json(),
                  **{f"fleet: {lane}": agg.to_json() for lane, agg in served.lanes.items()}}
        if data.get("engine_latency"):
            groups["engine in-process: all"] = data["engine_latency"]
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in data["slo_ms"].items()) or "none"
        parts += ["", "## Fleet through Kafka, measured by the client", "",
                  f"SLO for goodput: {slo}.", "", report.throughput_table(groups), "",
                  report.latency_table(groups)]
    profile = data["systems"]["engine"].get("details", {}).get("profile")
    if profile:
        parts += ["", "## Where the engine's time goes (in-process run)", "",
                  report.profile_table(profile)]
    if data["sweep"]:
        rows = [[f"{p['rate']:.2f}", p["completed"], f"{p['request_throughput']:.2f}",
                 p["output_tokens_per_s"], p["ttft_p50_ms"], p["ttft_p99_ms"], p["tpot_p50_ms"],
                 f"{100 * p['slo_attainment']:.0f}%" if p["slo_attainment"] is not None else "-"]
                for p in data["sweep"]]
        parts += ["", "## Rate sweep (fleet, Poisson arrivals)", "",
                  report.md_table(["rate req/s", "completed", "req/s", "output tok/s",
                                   "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "met SLO"], rows)]
    parts += ["", "Plots: " + ", ".join(f"`{p}`" for p in data["plots"])]
    return "\n".join(parts)

