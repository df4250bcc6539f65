"""Shared set-up of the benchmarks: options, the model folder, the workload, in-process systems."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamer.bench.prefix import PrefixSpec
from streamer.bench.results import LABELS, SystemResult
from streamer.bench.workload import Workload, WorkloadSpec, build_workload
from streamer.config import EngineConfig

DEFAULT_MODELS_DIR = Path(".streamer/models")
DEFAULT_MIX = "urgent=0.05,high=0.15,normal=0.5,low=0.3"
ENGINE_DEFAULTS = EngineConfig()
"""The engine's own defaults: what a user who sets nothing runs, so what the bench runs."""


@dataclass(frozen=True)
class BenchOptions:
    """One configuration for every system compared (the engine and the fleet's worker alike)."""

    model: str
    preset: str = "bench"
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    kv_cache_bytes: int | None = None
    """None: the engine's default budget (1 GiB on CPU); transformers' continuous batching gets
    the same bytes."""
    max_model_len: int | None = None  # the model's own context: the default a user gets
    static_batch: int = 32
    static_window_s: float = 0.010
    ceiling_batches: tuple[int, ...] = (16, 32, 64)
    threads: int | None = None
    """torch intra-op threads, in this process and (OMP_NUM_THREADS) in fleet workers."""
    repeat: int = 1
    """Rounds of every system (order reversed on odd rounds); each system's best round counts."""
    systems: tuple[str, ...] | None = None
    """Only these systems and scenarios (None: all of them)."""
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    prefix: PrefixSpec = field(default_factory=PrefixSpec)
    """The shared-system-prompt scenario."""
    workers: int = 1
    """Workers in the fleet (each with the engine settings above)."""
    worker_flags: tuple[str, ...] = ()
    """Extra `streamer worker` flags for the fleet (e.g. --chunk-ms 0)."""

    def wants(self, name: str) -> bool:
        return self.systems is None or name in self.systems

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["workload"] = self.workload.to_json()
        out["prefix"] = self.prefix.to_json()
        return out

    def engine_args(self) -> dict[str, Any]:
        return {"max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "kv_cache_bytes": self.kv_cache_bytes, "max_model_len": self.max_model_len}


def resolve_model(model: str | None, preset: str) -> str:
    """`model` as given, or the preset's offline model under .streamer/models/<preset>."""
    if model:
        return model
    from streamer.tiny_model import PRESETS, ensure_tiny_model

    return str(ensure_tiny_model(DEFAULT_MODELS_DIR / preset, PRESETS[preset]))


def kv_budget(options: BenchOptions) -> int:
    """The engine's KV budget in bytes as the bench configures it (the CPU default when unset)."""
    from streamer.engine.loading import CPU_DEFAULT_KV_BYTES

    return options.kv_cache_bytes or CPU_DEFAULT_KV_BYTES


def apply_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads. On a shared machine 2 spinning threads per process can be
    several times slower than 1; whatever is chosen, every system runs with the same setting."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_env(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def load_workload(options: BenchOptions) -> tuple[Workload, Any]:
    from streamer.engine.model import load_tokenizer

    tokenizer = load_tokenizer(options.model)  # a folder or a .gguf file
    return build_workload(options.workload, tokenizer), tokenizer


def load_hf_model(path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from streamer.engine.model import pretrained_args

    name, kwargs = pretrained_args(path)  # a folder or a .gguf file (dequantized)
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs).eval()


def timed_system(name: str, fn: Callable[[], SystemResult], log: Callable[[str], None]
                 ) -> SystemResult:
    """Run one system, log its figure, and note the machine's load around it (noise hints)."""
    log(f"running {name} ...")
    load_before = _loadavg()
    began = time.monotonic()
    result = fn()
    result.details.setdefault("loadavg_before", load_before)
    result.details.setdefault("loadavg_after", _loadavg())
    result.details.setdefault("elapsed_including_setup_s", time.monotonic() - began)
    if result.ok:
        log(f"  {name}: {result.tokens_per_s:.1f} useful tokens/s "
            f"({result.useful_tokens} tokens in {result.wall_s:.2f} s)")
    else:
        log(f"  {name}: failed: {result.error}")
    return result


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def ceiling_shape(workload: Workload) -> tuple[int, int]:
    """Prompt length and decode steps of the ceiling: the workload's means."""
    n = len(workload.requests)
    return (round(workload.prompt_tokens / n), round(workload.requested_tokens / n))


SKIPPED = "skipped (--systems)"


def run_rounds(runners: dict[str, Callable[[], SystemResult]], order: Sequence[str], repeat: int,
               log: Callable[[str], None], selected: Collection[str] | None = None
               ) -> dict[str, SystemResult]:
    """Run every (selected) system `repeat` times and keep each one's best round.

    On a shared machine other work only ever slows a run down, so the fastest of several rounds
    is the least disturbed one. Odd rounds run in reverse order, so no system always runs at
    the same point of a slow drift. Every round's figure stays in `details["rounds"]`.
    """
    skipped = [name for name in order if selected is not None and name not in selected]
    order = [name for name in order if name not in skipped]
    rounds: dict[str, list[SystemResult]] = {name: [] for name in order}
    for index in range(max(1, repeat)):
        names = list(order) if index % 2 == 0 else list(reversed(order))
        if repeat > 1:
            log(f"round {index + 1}/{repeat}: {', '.join(names)}")
        for name in names:
            rounds[name].append(timed_system(name, runners[name], log))
    best: dict[str, SystemResult] = {}
    for name in order:
        results = rounds[name]
        ok = [r for r in results if r.ok]
        chosen = max(ok, key=lambda r: r.tokens_per_s or 0.0) if ok else results[-1]
        chosen.details["rounds"] = [
            {"useful_tokens_per_s": r.tokens_per_s, "wall_s": r.wall_s, "error": r.error,
             "loadavg_before": r.details.get("loadavg_before"),
             "loadavg_after": r.details.get("loadavg_after")} for r in results]
        best[name] = chosen
    for name in skipped:
        best[name] = SystemResult(name, LABELS.get(name, name), error=SKIPPED)
    return best
