"""Where an engine step's time goes: attention vs MLP vs the rest, and the tokens of every step.

Attached from outside to a running `Engine` (its code is left as it is), only for a profiling
pass: forward hooks on the checkpoint's own modules of every stage (`self_attn`, `mlp`, the
norms, the embedding and the LM head), the registered paged attention function swapped for a
timed wrapper, the step's sampler wrapped, and `on_step` recording each step. On CPU torch runs
synchronously, so wall time around a module is its compute; on CUDA every timer synchronises
first (slower, but honest), which is why none of this is attached to a measured run.

Parts of a step, all wall seconds summed over the pass:
* attention: the paged attention function (write the new keys/values, gather blocks, SDPA);
* attention projections: the rest of `self_attn` (q/k/v/o projections, rotary, reshapes);
* MLP, norms, embedding + LM head, sampling: those modules and the sampler;
* stage other: the stages' forward time outside all of the above (step metadata, Python between
  layers);
* engine host: the scheduler's planning, the batch build and the scheduler's update;
* output processing: turning sampled tokens into per-request outputs (detokenizing);
* loop other: the rest of the wall time (event loop, stream consumers, thread hand-offs).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MODULE_PARTS = ("attention", "attention_proj", "mlp", "norms", "embed_lm_head", "sampling")
PART_LABELS = {
    "attention": "attention (paged KV write + gather + SDPA)",
    "attention_proj": "attention projections (q/k/v/o, rotary)",
    "mlp": "MLP",
    "norms": "RMSNorms",
    "embed_lm_head": "embedding + LM head",
    "sampling": "sampling",
    "stage_other": "stage other (step metadata, Python between layers)",
    "engine_host": "engine host (schedule, batch build, update)",
    "output_processing": "output processing (detokenize, per-request outputs)",
    "loop_other": "event loop and the rest",
}
PART_SHORT = {
    "attention": "attention", "attention_proj": "attn projections", "mlp": "MLP",
    "norms": "norms", "embed_lm_head": "embed + LM head", "sampling": "sampling",
    "stage_other": "stage other", "engine_host": "engine host", "output_processing": "outputs",
    "loop_other": "event loop, rest",
}
# What counts as Python / host overhead in the summary (everything that is not a model module).
OVERHEAD_PARTS = ("stage_other", "engine_host", "output_processing", "loop_other")


@dataclass
class StepRecord:
    """One engine step: what it computed and how long it took (ms), split by part."""

    tokens: int
    seqs: int
    prefill_tokens: int
    decode_seqs: int
    ms: float
    parts_ms: dict[str, float]


@dataclass
class LayerProfiler:
    """Accumulates seconds per part; `attach(engine)` wires it in, `detach()` undoes it."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODULE_PARTS, 0.0))
    host_s: float = 0.0
    process_s: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    _attn_block_s: float = 0.0
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _starts: dict[int, float] = field(default_factory=dict, repr=False)
    _sync: Callable[[], None] | None = field(default=None, repr=False)
    _last: dict[str, float] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ wiring

    def attach(self, engine: Any) -> None:
        """Hooks on every stage's modules, the attention function, the loop's host parts."""
        stages = engine.pipeline.stages
        if any(getattr(s, "device", torch.device("cpu")).type == "cuda" for s in stages):
            self._sync = torch.cuda.synchronize
        for stage in stages:
            layers, embed, head, norms = _stage_modules(stage)
            for layer in layers:
                for name, child in layer.named_children():
                    if name in ("self_attn", "attention", "attn"):
                        self._hook(child, "_attn_block")
                    elif name in ("mlp", "feed_forward"):
                        self._hook(child, "mlp")
                    elif "norm" in name:
                        self._hook(child, "norms")
            for module in (embed, head):
                if module is not None:
                    self._hook(module, "embed_lm_head")
            for norm in norms:
                self._hook(norm, "norms")
        self._wrap_attention()
        self._wrap_engine(engine)

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()

    @contextlib.contextmanager
    def attached(self, engine: Any) -> Iterator[LayerProfiler]:
        self.attach(engine)
        try:
            yield self
        finally:
            self.detach()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(MODULE_PARTS, 0.0)
        self._attn_block_s = self.host_s = self.process_s = 0.0
        self.steps = []
        self._last = {}

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _add(self, part: str, seconds: float) -> None:
        if part == "_attn_block":
            self._attn_block_s += seconds
        else:
            self.seconds[part] += seconds

    def _hook(self, module: torch.nn.Module, part: str) -> None:
        def before(mod: torch.nn.Module, _args: Any) -> None:
            self._starts[id(mod)] = self._now()

        def after(mod: torch.nn.Module, _args: Any, _out: Any) -> None:
            began = self._starts.pop(id(mod), None)
            if began is not None:
                self._add(part, self._now() - began)

        handles = (module.register_forward_pre_hook(before), module.register_forward_hook(after))

        def remove() -> None:
            for handle in handles:
                handle.remove()

        self._undo.append(remove)

    def _wrap_attention(self) -> None:
        """Swap the registered attention function for a timed one (looked up on every call)."""
        from transformers import AttentionInterface

        from streamer.engine.attention import ATTENTION_NAME

        try:
            original = AttentionInterface()[ATTENTION_NAME]
        except KeyError:  # not loaded with the paged attention: attention stays in its block
            return
        timed = self._timed("attention", original)
        AttentionInterface.register(ATTENTION_NAME, timed)
        self._undo.append(lambda: AttentionInterface.register(ATTENTION_NAME, original))

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(part, self._now() - began)

        return wrapper

    def _wrap_engine(self, engine: Any) -> None:
        """Host parts of the loop, the sampler of every batch, and one record per step."""
        scheduler = engine.scheduler
        saved = {"schedule_next": scheduler.schedule_next, "complete": scheduler.complete}
        build, process, on_step = engine._build, engine._process, engine.on_step

        def host(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.host_s += time.perf_counter() - began
            return wrapper

        def timed_build(plan: Any) -> Any:
            began = time.perf_counter()
            batch = build(plan)
            batch.sampler = self._timed("sampling", batch.sampler)
            self.host_s += time.perf_counter() - began
            return batch

        def timed_process(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return process(*args, **kwargs)
            finally:
                self.process_s += time.perf_counter() - began

        def record(plan: Any, seconds: float) -> None:
            self._record(plan, seconds)
            if on_step is not None:
                on_step(plan, seconds)

        scheduler.schedule_next = host(saved["schedule_next"])
        scheduler.complete = host(saved["complete"])
        engine._build, engine._process, engine.on_step = timed_build, timed_process, record

        def undo() -> None:
            scheduler.schedule_next, scheduler.complete = saved["schedule_next"], saved["complete"]
            engine._build, engine._process, engine.on_step = build, process, on_step

        self._undo.append(undo)

    def _record(self, plan: Any, seconds: float) -> None:
        now = self._totals()
        parts = {k: 1000 * (v - self._last.get(k, 0.0)) for k, v in now.items()}
        self._last = now
        prefill = [item for item in plan.items if item.start < len(item.seq.prompt_ids)]
        self.steps.append(StepRecord(
            tokens=plan.num_tokens, seqs=len(plan.items),
            prefill_tokens=sum(item.num_tokens for item in prefill),
            decode_seqs=len(plan.items) - len(prefill), ms=1000 * seconds, parts_ms=parts))

    def _totals(self) -> dict[str, float]:
        out = dict(self.seconds)
        out["attention_proj"] = max(0.0, self._attn_block_s - self.seconds["attention"])
        return out

    # ------------------------------------------------------------------ results

    def to_json(self, wall_s: float, stage_s: float) -> dict[str, Any]:
        """Seconds and shares of the wall time per part, and per-step figures."""
        seconds = self._totals()
        seconds["stage_other"] = max(0.0, stage_s - sum(seconds.values()))
        seconds["engine_host"] = self.host_s
        seconds["output_processing"] = self.process_s
        seconds["loop_other"] = max(0.0, wall_s - sum(seconds.values()))
        steps = self.steps
        n = len(steps)
        share = {k: v / wall_s if wall_s > 0 else 0.0 for k, v in seconds.items()}
        return {
            "wall_s": wall_s, "stage_busy_s": stage_s, "steps": n,
            "seconds": seconds, "share": share, "labels": PART_LABELS,
            "overhead_share": sum(share[k] for k in OVERHEAD_PARTS),
            "tokens_per_step": _spread([s.tokens for s in steps]),
            "seqs_per_step": _spread([s.seqs for s in steps]),
            "ms_per_step": _spread([s.ms for s in steps]),
            "decode_only_steps": sum(1 for s in steps if s.prefill_tokens == 0),
            "prefill_tokens": sum(s.prefill_tokens for s in steps),
            "decode_tokens": sum(s.decode_seqs for s in steps),
            "per_step": [{"tokens": s.tokens, "seqs": s.seqs, "prefill_tokens": s.prefill_tokens,
                          "decode_seqs": s.decode_seqs, "ms": s.ms, "parts_ms": s.parts_ms}
                         for s in steps],
        }


def _spread(values: list[float] | list[int]) -> dict[str, float] | None:
    from streamer.bench.stats import percentile

    if not values:
        return None
    data = [float(v) for v in values]
    return {"mean": sum(data) / len(data), "p50": percentile(data, 50),
            "p90": percentile(data, 90), "min": min(data), "max": max(data)}


def _stage_modules(stage: Any) -> tuple[list[torch.nn.Module], Any, Any, list[torch.nn.Module]]:
    """A stage's own decoder layers, embedding (first stage), LM head (last) and final norms,
    read from its shell (`streamer.engine.shell.StageShell`)."""
    from streamer.engine.shell import decoder_layers

    shell = stage.shell
    _, layers = decoder_layers(shell.model)
    own = [layers[i] for i in stage.layer_range]
    embed = shell.model.get_input_embeddings() if shell.first else None
    head = shell.model.get_output_embeddings() if shell.last else None
    base = shell.model.base_model
    norms = [m for n, m in base.named_children() if shell.last and "norm" in n]
    return own, embed, head, norms
