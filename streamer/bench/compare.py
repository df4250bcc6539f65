"""`streamer bench compare`: the fleet through Kafka against everything else, in one run.

On one model and one seeded workload: (a) the raw forward-loop ceiling, (b) the engine
in-process, (c) one worker behind the embedded broker, driven by `bench serve`'s load generator,
(d) static micro-batching, (e) transformers' continuous batching; then the engine scenarios
(a profiled pass: attention vs MLP vs the rest, tokens per step; TTFT with a cached shared system
prompt), KV capacity, every target of the issues next to its measured figure, and optionally (f)
a rate sweep of the fleet. Writes compare.json, compare.md and PNG plots to the output folder.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamer.bench import plots, probe, report
from streamer.bench.engine import inprocess_runners
from streamer.bench.local_fleet import LocalFleet, local_fleet, worker_args
from streamer.bench.results import LABELS, SystemResult, machine_info
from streamer.bench.scenarios import scenario_data
from streamer.bench.serve import run_load
from streamer.bench.stats import aggregate, per_lane
from streamer.bench.suite import BenchOptions, load_workload, run_rounds, worker_env
from streamer.bench.workload import Workload, build_workload, warm_up_requests

COMPARE_RATIOS = ("fleet/static", "fleet/hf_cb", "fleet/engine", "engine/ceiling",
                  "engine/static", "engine/hf_cb")
# The fleet right after the engine: the two systems compared most closely run back to back.
COMPARE_ORDER = ("ceiling", "engine", "fleet", "static", "hf_cb")
COMPARE_TARGETS = ("fleet/static", "fleet/hf_cb", "engine/ceiling", "kv_tokens_per_gib",
                   "prefix_ttft_ratio", "fleet/engine", "engine/static", "engine/hf_cb")


async def run_fleet(options: BenchOptions, workload: Workload, *, slo: dict[str, float],
                    log_dir: Path, log: Callable[[str], None]) -> SystemResult:
    """Broker + topics + N workers, a short warm-up, the offline workload; everything stopped."""
    result = SystemResult("fleet", LABELS["fleet"])
    try:
        async with _fleet(options, log_dir) as fleet:
            log(f"  fleet ready (prefix {fleet.prefix}); warming up")
            await _warm_up(fleet, workload, slo)
            procs = fleet.fleet.procs
            ids = ([w.process.pid if w.process else None for w in procs],
                   [probe.metrics_port(w.log_path) for w in procs], fleet.broker_pid)
            before = await probe.snapshot(*ids)
            served = await run_load(fleet.kafka, fleet.prefix, workload, slo=slo)
            resources = probe.usage(before, await probe.snapshot(*ids))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.timings = served.timings
    result.wall_s = served.duration_s
    result.useful_tokens = served.overall.useful_tokens
    result.details = {"completed": served.overall.completed, "failures": served.failures,
                      "config": options.engine_args(), "cpu": resources,
                      "serve": served.to_json()}
    if served.failures:
        result.error = f"requests failed: {served.failures}"
    return result


async def run_sweep(options: BenchOptions, workloads: Sequence[Workload], *,
                    slo: dict[str, float], capacity_rps: float, fractions: Sequence[float],
                    log_dir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Poisson arrivals at fractions of the offline request throughput, on a fresh fleet.

    Each point has a workload of its own (same distribution, another seed): the worker caches
    prompt prefixes, so the same prompts again would find their prefill already done."""
    points = []
    async with _fleet(options, log_dir) as fleet:
        await _warm_up(fleet, workloads[0], slo)
        for fraction, workload in zip(fractions, workloads, strict=True):
            rate = capacity_rps * fraction
            log(f"  sweep: {rate:.2f} req/s ({fraction:g} x offline throughput)")
            load_before = _loadavg()
            served = await run_load(fleet.kafka, fleet.prefix, workload.with_arrivals(rate, 1.0),
                                    slo=slo)
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
                "loadavg_before": load_before, "loadavg_after": _loadavg(),
            })
    return points


def _fleet(options: BenchOptions, log_dir: Path) -> Any:
    args = [*worker_args(options.model, **options.engine_args()), *options.worker_flags]
    return local_fleet(args, log_dir=log_dir, workers=options.workers,
                       env=worker_env(options.threads))


async def _warm_up(fleet: LocalFleet, workload: Workload, slo: dict[str, float]) -> None:
    """Four requests with 8-token completions, untimed (first kernels, producer, consumer), whose
    prompts leave nothing in the worker's prefix cache for the measured requests."""
    await run_load(fleet.kafka, fleet.prefix, Workload(workload.spec, warm_up_requests(workload)),
                   slo=slo)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_compare(options: BenchOptions, out_dir: Path, *, slo: dict[str, float],
                sweep_fractions: Sequence[float] = (), log: Callable[[str], None] = print) -> int:
    began = time.monotonic()
    workload, tokenizer = load_workload(options)
    log(f"workload: {len(workload.requests)} requests, {workload.requested_tokens} requested "
        f"tokens, {workload.prompt_tokens} prompt tokens; model {options.model}")
    log_dir = out_dir / "logs"
    runners = inprocess_runners(options, workload, tokenizer)
    runners["fleet"] = lambda: asyncio.run(run_fleet(options, workload, slo=slo,
                                                     log_dir=log_dir, log=log))
    systems = run_rounds(runners, COMPARE_ORDER, options.repeat, log, options.systems)
    ordered = [systems[name] for name in COMPARE_ORDER]
    fleet = systems["fleet"]

    sweep: list[dict[str, Any]] = []
    if sweep_fractions and fleet.ok:
        capacity = fleet.details["serve"]["overall"]["request_throughput"]
        try:
            workloads = [build_workload(replace(options.workload, seed=options.workload.seed
                                                + 1 + i), tokenizer)
                         for i in range(len(sweep_fractions))]
            sweep = asyncio.run(run_sweep(options, workloads, slo=slo, capacity_rps=capacity,
                                          fractions=sweep_fractions, log_dir=log_dir, log=log))
        except Exception as exc:  # the offline figures still stand; say what went wrong
            log(f"  sweep failed: {type(exc).__name__}: {exc}")

    data: dict[str, Any] = {
        "benchmark": "compare", "machine": machine_info(), "model": options.model,
        "config": options.to_json(), "workload": options.workload.to_json(),
        "workload_totals": {"requested_tokens": workload.requested_tokens,
                            "prompt_tokens": workload.prompt_tokens},
        "seed": options.workload.seed, "slo_ms": {k: v * 1000 for k, v in slo.items()},
        "systems": {s.name: s.to_json() for s in ordered},
        "ratios": report.ratios(systems, COMPARE_RATIOS),
        "sweep": sweep,
    }
    data.update(scenario_data(options, workload, tokenizer, data["ratios"], COMPARE_TARGETS, log))
    engine = systems["engine"]
    if engine.ok:
        data["engine_latency"] = aggregate(engine.timings, engine.wall_s, slo).to_json()
        data["engine_lanes"] = {lane: agg.to_json() for lane, agg in
                                per_lane(engine.timings, engine.wall_s, slo).items()}
    data["plots"] = [p.name for p in _plots(out_dir, ordered, systems, sweep, data)]
    data["total_elapsed_s"] = time.monotonic() - began
    for path in report.write_results(out_dir, "compare", data, compare_markdown(data, ordered)):
        log(f"wrote {path}")
    log(f"done in {data['total_elapsed_s']:.0f} s")
    return 0 if engine.ok and fleet.ok else 1


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
    paths += plots.scenario_plots(out_dir, "compare", data.get("scenarios") or {})
    return paths


def compare_markdown(data: dict[str, Any], ordered: list[SystemResult]) -> str:
    m, w, cfg = data["machine"], data["workload"], data["config"]
    parts = [
        "# streamer bench compare",
        "",
        f"Model `{data['model']}`; {w['num_requests']} requests, prompts {w['prompt_range']} "
        f"tokens, outputs {w['output_range']} tokens (ignore_eos), lanes {w['mix']}, seed "
        f"{w['seed']}, all sent at once; {data['workload_totals']['requested_tokens']} requested "
        f"tokens. {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}. Engine and worker: max_num_seqs="
        f"{cfg['max_num_seqs']}, max_num_batched_tokens={cfg['max_num_batched_tokens']}. "
        f"Best of {cfg['repeat']} round(s) per system.",
        "",
        "## Targets",
        "",
        report.targets_table(data["targets"]),
        "",
        report.hf_cache_note(data),
        "",
        report.ceiling_note(data),
        "",
        "## Useful tokens/s",
        "",
        report.systems_table(ordered),
        "",
        report.ratios_table(data["ratios"]),
    ]
    serve = data["systems"]["fleet"].get("details", {}).get("serve")
    if serve:
        groups = {"fleet: all": serve["overall"],
                  **{f"fleet: {lane}": agg for lane, agg in serve["lanes"].items()}}
        if data.get("engine_latency"):
            groups["engine in-process: all"] = data["engine_latency"]
            groups.update({f"engine in-process: {lane}": agg
                           for lane, agg in data.get("engine_lanes", {}).items()})
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in data["slo_ms"].items()) or "none"
        parts += ["", "## Fleet through Kafka, measured by the client", "",
                  f"SLO for goodput: {slo}.", "", report.throughput_table(groups), "",
                  report.latency_table(groups)]
    engine_cpu = data["systems"]["engine"].get("details", {}).get("cpu")
    fleet_cpu = data["systems"]["fleet"].get("details", {}).get("cpu")
    if engine_cpu or fleet_cpu:
        parts += ["", "## CPU used during the measured window", "",
                  report.cpu_table(engine_cpu, fleet_cpu)]
    parts += report.scenario_sections(data, data["systems"]["engine"].get("details", {}))
    if data["sweep"]:
        rows = [[f"{p['rate']:.2f}", p["completed"], f"{p['request_throughput']:.2f}",
                 p["output_tokens_per_s"], p["ttft_p50_ms"], p["ttft_p99_ms"], p["tpot_p50_ms"],
                 f"{100 * p['slo_attainment']:.0f}%" if p["slo_attainment"] is not None else "-",
                 p["loadavg_before"]]
                for p in data["sweep"]]
        parts += ["", "## Rate sweep (fleet, Poisson arrivals)", "",
                  report.md_table(["rate req/s", "completed", "req/s", "output tok/s",
                                   "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "met SLO",
                                   "load avg"], rows)]
    parts += ["", "Plots: " + ", ".join(f"`{p}`" for p in data["plots"])]
    return "\n".join(parts)

