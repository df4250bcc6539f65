"""Running `streamer tune`: trials of candidate configs against the current one, A/B per candidate.

Coordinate descent: knob by knob, every candidate value is measured against the current config in
the same run (ABBA order, `repeats` rounds of each arm); `rule.decide` adopts it only when the gain
beats both the threshold and the noise between repeats. An adopted value becomes the baseline for
the next candidates. A trial is the whole workload on a fresh engine (`--target engine`) or on one
fresh worker behind the embedded broker (`--target fleet`); its score is goodput (requests within
the SLO per second) when an SLO is given, else useful tokens per second.

Outputs: `tuned.yaml` (the winner, read by `streamer worker --config`), `tune.json` (every trial),
`tune.md` (the table) and `tune.png` (every trial's scores).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from streamer.bench import report
from streamer.bench.inprocess import run_engine
from streamer.bench.results import machine_info
from streamer.bench.stats import aggregate
from streamer.bench.workload import Workload
from streamer.config import EngineConfig
from streamer.tune.rule import FLEET_ONLY, Verdict, arm_order, candidates, decide

ENGINE_KNOBS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    model: str
    workload: Workload
    knobs: dict[str, tuple[Any, ...]]
    target: str = "engine"
    slo: Mapping[str, float] = dataclasses.field(default_factory=dict)
    repeats: int = 2
    threshold: float = 0.05
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The starting config's knob values (defaults, or a config file's)."""
    threads: int = 1
    """torch threads of a trial whose knobs do not set torch_threads."""


def score(timings: list[Any], wall_s: float, slo: Mapping[str, float]) -> float:
    agg = aggregate(timings, wall_s, slo or None)
    if slo:
        return float(agg.goodput or 0.0)
    return agg.useful_tokens_per_s


def _engine_config(model: str, knobs: Mapping[str, Any]) -> EngineConfig:
    values = {k: v for k, v in knobs.items() if k in ENGINE_KNOBS}
    if isinstance(values.get("devices"), str):
        values["devices"] = tuple(values["devices"].split(","))
    return EngineConfig(model=model, **values)


def _worker_flags(knobs: Mapping[str, Any]) -> list[str]:
    flags = []
    for name, value in knobs.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


async def _trial(options: TuneOptions, knobs: Mapping[str, Any], log_dir: Path) -> float:
    if options.target == "engine":
        import torch

        # Threads are process-wide: every trial sets its own (the start's when it names none).
        torch.set_num_threads(knobs.get("torch_threads") or options.threads)
        result = await run_engine(_engine_config(options.model, knobs), options.workload)
        if result.error:
            raise RuntimeError(result.error)
        return score(result.timings, result.wall_s, options.slo)
    from streamer.bench.local_fleet import local_fleet
    from streamer.bench.serve import run_load

    flags = ["--model", options.model, "--devices", "cpu", *_worker_flags(knobs)]
    async with local_fleet(flags, log_dir=log_dir) as fleet:
        served = await run_load(fleet.kafka, fleet.prefix, options.workload, slo=options.slo)
    return score(served.timings, served.duration_s, options.slo)


def run_tune(options: TuneOptions, out: Path) -> dict[str, Any]:
    """Search, write the outputs, return what was written (also as `tune.json`)."""
    current = {k: options.base.get(k, _default(k)) for k in options.knobs}
    trials: list[dict[str, Any]] = []
    began = time.monotonic()
    for name, value in candidates(options.knobs, current):
        if name in FLEET_ONLY and options.target != "fleet":
            continue
        candidate = {**current, name: value}
        scores: dict[str, list[float]] = {"A": [], "B": []}
        error = None
        for i, arm in enumerate(arm_order(options.repeats)):
            knobs = current if arm == "A" else candidate
            print(f"trial {name}={value} [{arm}] ...", flush=True)
            try:
                scores[arm].append(asyncio.run(_trial(options, knobs, out / "logs" / f"t{i}")))
            except Exception as exc:  # a config that fails (too little memory, ...) loses
                error = f"{type(exc).__name__}: {exc}"[:300]
                break
        verdict = (decide(scores["A"], scores["B"], options.threshold) if error is None
                   else Verdict(False, 0.0, 0.0, f"failed: {error}"))
        trials.append({"knob": name, "value": value, "baseline": dict(current),
                       "baseline_scores": scores["A"], "candidate_scores": scores["B"],
                       "gain": verdict.gain, "noise": verdict.noise, "adopted": verdict.adopt,
                       "reason": verdict.reason})
        print(f"  {name}={value}: {verdict.reason}", flush=True)
        if verdict.adopt:
            current = candidate
    changed = {k: v for k, v in current.items() if not _equal(v, _default(k))}
    data = {"benchmark": "tune", "machine": machine_info(), "model": options.model,
            "target": options.target, "slo_ms": {k: v * 1000 for k, v in options.slo.items()},
            "metric": "goodput (req/s within SLO)" if options.slo else "useful tokens/s",
            "repeats": options.repeats, "threshold": options.threshold,
            "workload": options.workload.spec.to_json(), "start": dict(options.base),
            "winner": current, "changed": changed, "trials": trials,
            "elapsed_s": time.monotonic() - began}
    write_outputs(out, data)
    return data


def write_outputs(out: Path, data: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# streamer tune: {data['model']} ({data['target']})\n"
              f"# metric: {data['metric']}; threshold {data['threshold']:.0%} beyond the noise\n"
              "# read with: streamer worker --config THIS_FILE (flags override it)\n")
    winner = {k: (",".join(v) if isinstance(v, tuple | list) else v)
              for k, v in data["winner"].items() if v is not None}  # None: the default
    (out / "tuned.yaml").write_text(header + yaml.safe_dump(winner, sort_keys=True))
    lines = [f"# streamer tune ({data['target']}, {data['metric']})", "",
             f"Winner: `{winner}`; changed from the defaults: `{data['changed'] or 'nothing'}`.",
             "", "| knob | value | baseline | candidate | gain | noise | adopted | why |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for t in data["trials"]:
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs) or "-"  # noqa: E731
        lines.append(f"| {t['knob']} | {t['value']} | {fmt(t['baseline_scores'])} | "
                     f"{fmt(t['candidate_scores'])} | {t['gain']:+.1%} | {t['noise']:.1%} | "
                     f"{'yes' if t['adopted'] else 'no'} | {t['reason']} |")
    report.write_results(out, "tune", data, "\n".join(lines))
    _plot(out / "tune.png", data)


def _plot(path: Path, data: Mapping[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    trials = data["trials"]
    fig, ax = plt.subplots(figsize=(max(6, len(trials) * 0.9), 4))
    for i, t in enumerate(trials):
        ax.scatter([i - 0.1] * len(t["baseline_scores"]), t["baseline_scores"], color="grey",
                   label="current" if i == 0 else None)
        ax.scatter([i + 0.1] * len(t["candidate_scores"]), t["candidate_scores"],
                   color="green" if t["adopted"] else "red",
                   label="candidate" if i == 0 else None)
    ax.set_xticks(range(len(trials)), [f"{t['knob']}={t['value']}" for t in trials],
                  rotation=45, ha="right")
    ax.set_ylabel(data["metric"])
    ax.set_title("streamer tune: every trial (green: adopted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _default(name: str) -> Any:
    from streamer.config import WorkerConfig

    if name in ENGINE_KNOBS:
        value = getattr(EngineConfig(), name)
        return value if name != "devices" else ",".join(value)
    return getattr(WorkerConfig(engine=EngineConfig(model="x")), name)


def _equal(a: Any, b: Any) -> bool:
    norm = lambda v: ",".join(v) if isinstance(v, tuple | list) else v  # noqa: E731
    return bool(norm(a) == norm(b))
