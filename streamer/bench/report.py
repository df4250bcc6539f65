"""Result files: one JSON (everything) and one Markdown summary per benchmark run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from streamer.bench.profiler import PART_LABELS
from streamer.bench.results import SystemResult, ratio
from streamer.bench.targets import BY_KEY


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratios(systems: Mapping[str, SystemResult], pairs: Sequence[str]) -> dict[str, float | None]:
    """{'a/b': a's tokens/s over b's} for each requested pair."""
    out = {}
    for pair in pairs:
        a, b = pair.split("/")
        out[pair] = ratio(systems.get(a), systems.get(b))
    return out


def systems_table(systems: Sequence[SystemResult]) -> str:
    ceiling = next((s for s in systems if s.name == "ceiling" and s.ok), None)
    rows = []
    for s in systems:
        vs = ratio(s, ceiling) if ceiling is not None else None
        rounds = " / ".join(fmt(r["useful_tokens_per_s"], 0) for r in s.details.get("rounds", []))
        rows.append([s.label, s.useful_tokens if s.ok else None, s.wall_s if s.ok else None,
                     s.tokens_per_s, f"{vs:.2f}" if vs is not None else "-", rounds or "-",
                     s.error or ""])
    return md_table(["system", "useful tokens", "wall s", "useful tokens/s", "x ceiling",
                     "every round, tok/s", "error"], rows)


def ratios_table(measured: Mapping[str, float | None]) -> str:
    rows = []
    for pair, value in measured.items():
        target = BY_KEY.get(pair)
        verdict = target.verdict(value) if target is not None else None
        rows.append([pair, f"{value:.2f}" if value is not None else "-",
                     target.bound_text() if target is not None else "-", _verdict(verdict)])
    return md_table(["ratio (useful tokens/s)", "measured", "target", ""], rows)


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "**missed**")


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The issues' bars next to this run's figures (from `targets.evaluate`)."""
    def shown(row: Mapping[str, Any]) -> str:
        value = row["measured"]
        if value is None:
            return "- (not measured)"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"

    return md_table(["target", "figure", "measured", "required", "verdict", "issue"],
                    [[row["label"], f"`{row['key']}`", shown(row), row["target"],
                      _verdict(row["met"]), row["source"]] for row in rows])


def kv_table(capacity: Mapping[str, Any] | None, allocated: Mapping[str, Any] | None) -> str:
    """Tokens per GiB of float32 KV (the layout's arithmetic) and what the engine allocated."""
    rows = []
    if capacity:
        rows.append(["float32 KV per GiB (arithmetic)", capacity["tokens_per_gib"],
                     capacity["blocks_per_gib"], capacity["bytes_per_token"], "-", "-"])
    if allocated:
        mb = allocated.get("bytes")
        rows.append([f"engine's cache ({mb / 2**20:,.0f} MiB)" if mb else "engine's cache",
                     allocated["tokens"], allocated["num_blocks"],
                     capacity["bytes_per_token"] if capacity else "-",
                     allocated.get("full_context_sequences"),
                     allocated.get("mean_requests_that_fit")])
    note = ""
    if capacity:
        note = (f"\n\n{capacity['layers']} layers x {capacity['kv_heads']} KV heads x head_dim "
                f"{capacity['head_dim']} x 2 (K and V) x 4 bytes = {capacity['bytes_per_token']:,} "
                f"bytes per token; blocks of {capacity['block_size']} tokens.")
    return md_table(["KV cache", "tokens", "blocks", "bytes/token", "full-context sequences",
                     "mean-size requests"], rows) + note


def step_profile_table(profile: Mapping[str, Any]) -> str:
    """Where a profiled pass's wall time went, part by part, and the tokens of its steps."""
    if profile.get("error"):
        return f"Profiling pass failed: {profile['error']}"
    steps = profile["steps"]
    rows = [[PART_LABELS.get(part, part), 1000 * seconds,
             f"{100 * profile['share'][part]:.1f}%", 1000 * seconds / steps if steps else None]
            for part, seconds in profile["seconds"].items()]
    table = md_table(["part of the step", "total ms", "share of wall", "ms per step"], rows)
    tps, sps, mps = (profile[k] or {} for k in ("tokens_per_step", "seqs_per_step",
                                                 "ms_per_step"))
    lines = [
        table, "",
        f"{steps} steps ({profile['decode_only_steps']} decode-only); tokens per step mean "
        f"{tps.get('mean', 0):.1f}, p50 {tps.get('p50', 0):.0f}, p90 {tps.get('p90', 0):.0f}, "
        f"max {tps.get('max', 0):.0f}; sequences per step mean {sps.get('mean', 0):.1f}; "
        f"{mps.get('mean', 0):.1f} ms per step (p90 {mps.get('p90', 0):.1f}). "
        f"{profile['prefill_tokens']:,} prompt tokens and {profile['decode_tokens']:,} decode "
        f"tokens computed. Python and host overhead (the last four rows): "
        f"{100 * profile['overhead_share']:.1f}% of the wall time.",
    ]
    if profile.get("useful_tokens_per_s"):
        lines.append(f"The profiled pass ran at {profile['useful_tokens_per_s']:.1f} useful "
                     "tokens/s (timers attached; the measured figure is the unprofiled run).")
    return "\n".join(lines)


def prefix_table(prefix: Mapping[str, Any]) -> str:
    """TTFT of cached vs uncached shared-system-prompt requests."""
    if prefix.get("error"):
        return f"Prefix scenario failed: {prefix['error']}"
    spec = prefix["spec"]
    rows = []
    for kind in ("uncached", "cached"):
        k = prefix[kind]
        ttft = k["ttft_ms"] or {}
        rows.append([kind, k["requests"], k["mean_prompt_tokens"], k["mean_cached_tokens"],
                     ttft.get("p50"), ttft.get("mean"), ttft.get("p90")])
    ratio_text = f"{prefix['ttft_ratio']:.3f}" if prefix["ttft_ratio"] is not None else "-"
    return (md_table(["requests", "count", "prompt tokens", "cached tokens (hit)",
                      "TTFT p50 ms", "TTFT mean ms", "TTFT p90 ms"], rows)
            + f"\n\nA {spec['prefix_tokens']}-token system prompt plus a question of "
            f"{spec['suffix_range'][0]}-{spec['suffix_range'][1]} tokens, {spec['max_tokens']} "
            "completion tokens, one request at a time (uncached and cached alternating, after "
            f"an untimed primer). Cached / uncached TTFT (p50): **{ratio_text}** (target <= 1/3).")


def latency_table(aggregates: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per (label, metric): mean, p50, p90, p99 in ms."""
    rows = []
    for label, agg in aggregates.items():
        for metric in ("ttft", "tpot", "itl", "e2e"):
            s = agg.get(f"{metric}_ms")
            if s:
                rows.append([label, metric.upper(), s["mean"], s["p50"], s["p90"], s["p99"]])
    return md_table(["requests", "metric", "mean ms", "p50 ms", "p90 ms", "p99 ms"], rows)


def throughput_table(aggregates: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[label, f"{a['completed']}/{a['requests']}", a["duration_s"],
             f"{a['request_throughput']:.2f}", a["output_tokens_per_s"],
             a["useful_tokens_per_s"],
             f"{a['goodput']:.2f}" if a.get("goodput") is not None else "-",
             f"{100 * a['slo_attainment']:.0f}%" if a.get("slo_attainment") is not None else "-"]
            for label, a in aggregates.items()]
    return md_table(["requests", "completed", "duration s", "req/s", "output tok/s",
                     "useful tok/s", "goodput req/s", "met SLO"], rows)


def profile_table(profile: Mapping[str, Any]) -> str:
    rows = [[part, 1000 * seconds, f"{100 * profile['share'][part]:.1f}%",
             1000 * seconds / profile["steps"] if profile["steps"] else None]
            for part, seconds in profile["seconds"].items()]
    table = md_table(["engine loop part", "total ms", "share of wall", "ms per step"], rows)
    return (f"{table}\n\n{profile['steps']} steps, {profile['mean_seqs_per_step']:.1f} sequences "
            f"and {profile['mean_tokens_per_step']:.1f} tokens per step on average, "
            f"{profile['ms_per_step']:.1f} ms per step.")


def write_results(out_dir: Path, name: str, data: Mapping[str, Any], markdown: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return [json_path, md_path]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def cpu_table(engine_cpu: Mapping[str, Any] | None, fleet_cpu: Mapping[str, Any] | None) -> str:
    """CPU seconds of the in-process engine against those of every process on the Kafka path.

    "stage busy" is wall time inside the stage's forward; above the process's CPU seconds it
    means the stage thread was waiting for a core.
    """
    rows = []
    if engine_cpu:
        rows.append(["engine in-process", engine_cpu["wall_s"], engine_cpu["stage_busy_s"],
                     engine_cpu["process_cpu_s"], None, None, engine_cpu["process_cpu_s"]])
    if fleet_cpu:
        parts = [fleet_cpu.get(k) for k in ("worker_cpu_s", "broker_cpu_s", "client_cpu_s")]
        total = sum(p for p in parts if p is not None)
        rows.append(["fleet via Kafka", fleet_cpu["wall_s"], fleet_cpu.get("worker_stage_busy_s"),
                     *parts, total])
    table = md_table(["run", "wall s", "stage busy s (wall)", "engine/worker CPU s",
                      "broker CPU s", "load generator CPU s", "total CPU s"], rows)
    if fleet_cpu and fleet_cpu.get("records_per_token") is not None:
        kafka = [[fleet_cpu.get(k) for k in (
            "generated_tokens", "token_records", "event_records", "records_per_token",
            "tokens_per_chunk", "records_per_s", "bytes_per_s", "broker_cpu_ms_per_token")]]
        table += "\n\nThe Kafka path's cost (all workers):\n\n" + md_table(
            ["generated tokens", "token chunks", "events", "records / token", "tokens / chunk",
             "records/s", "bytes/s", "broker CPU ms / token"], kafka)
    return table


def scenario_sections(data: Mapping[str, Any], engine_details: Mapping[str, Any]) -> list[str]:
    """KV capacity, the shared system prompt and where the engine's time goes."""
    scenarios = data.get("scenarios") or {}
    parts = ["", "## KV capacity", "",
             kv_table(data.get("kv_capacity"), scenarios.get("kv_cache")
                      or engine_details.get("kv_cache"))]
    if scenarios.get("error"):
        parts += ["", f"Engine scenarios failed: {scenarios['error']}"]
    if scenarios.get("prefix"):
        parts += ["", "## Shared system prompt (prefix cache)", "",
                  prefix_table(scenarios["prefix"])]
    loop = engine_details.get("profile")
    if loop or scenarios.get("profile"):
        parts += ["", "## Where the engine's time goes"]
    if scenarios.get("profile"):
        parts += ["", "Profiled pass (the same workload on a fresh engine, module timers on):", "",
                  step_profile_table(scenarios["profile"])]
    if loop:
        parts += ["", "The measured run, split by the loop's parts (no module timers):", "",
                  profile_table(loop)]
    return parts


def hf_cache_note(data: Mapping[str, Any]) -> str:
    """What transformers' continuous batching was given and what it made of it."""
    hf = data["systems"].get("hf_cb", {})
    cache = hf.get("details", {}).get("cache") or {}
    given, resolved = cache.get("given") or {}, cache.get("resolved") or {}
    if not given:
        return ""
    text = (f"transformers continuous batching was given the engine's KV budget "
            f"({given['kv_cache_bytes'] / 2**20:,.0f} MiB = {given['num_blocks']} pages of "
            f"{given['page_size']} tokens = {given['kv_tokens']:,} tokens), max_batch_tokens="
            f"{given['max_batch_tokens']}, max_requests_per_batch="
            f"{given['max_requests_per_batch']}")
    if resolved.get("num_blocks") is not None:
        text += (f"; it resolved num_blocks={resolved['num_blocks']}, max_batch_tokens="
                 f"{resolved['max_batch_tokens']}, attention "
                 f"`{resolved['attn_implementation']}`")
    return text + "."


def ceiling_note(data: Mapping[str, Any]) -> str:
    """The ceiling's trials at or below the engine's `max_num_seqs`, next to its best overall:
    the engine never runs a step of more sequences than that, the ceiling's best may."""
    ceiling = data["systems"].get("ceiling", {})
    engine = data["systems"].get("engine", {})
    trials = ceiling.get("details", {}).get("trials") or []
    limit = data["config"]["max_num_seqs"]
    within = [t for t in trials if t["batch_size"] <= limit]
    if not trials or not within or not engine.get("useful_tokens_per_s"):
        return ""
    best = max(within, key=lambda t: t["tokens_per_s"])
    every = ", ".join(f"batch {t['batch_size']}: {t['tokens_per_s']:.1f}" for t in trials)
    return (f"Ceiling trials (tokens/s): {every}. At the engine's max_num_seqs ({limit}) the "
            f"ceiling is {best['tokens_per_s']:.1f} tokens/s (batch {best['batch_size']}); "
            f"engine / that = {engine['useful_tokens_per_s'] / best['tokens_per_s']:.2f}.")
