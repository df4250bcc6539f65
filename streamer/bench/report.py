"""Result files: one JSON (everything) and one Markdown summary per benchmark run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from streamer.bench.results import SystemResult, ratio

# Where issue 3 puts the bar; reported next to each measured ratio, never asserted.
TARGETS: dict[str, float] = {
    "fleet/static": 1.5,
    "fleet/hf_cb": 1.2,
    "fleet/engine": 0.9,  # Kafka may cost at most 10% of the in-process engine
    "engine/static": 1.5,
    "engine/hf_cb": 1.2,
    "engine/ceiling": 0.8,
}


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
        target = TARGETS.get(pair)
        verdict = "-" if value is None or target is None else ("met" if value >= target
                                                                else "missed")
        rows.append([pair, f"{value:.2f}" if value is not None else "-",
                     f">= {target:g}" if target is not None else "-", verdict])
    return md_table(["ratio (useful tokens/s)", "measured", "target", ""], rows)


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
    return md_table(["run", "wall s", "stage busy s (wall)", "engine/worker CPU s",
                     "broker CPU s", "load generator CPU s", "total CPU s"], rows)
