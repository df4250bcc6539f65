"""The engine in-process: every request added to one `Engine`, streams read in the same loop.

Besides useful tokens/s this measures where the engine loop's time goes, from outside: the
scheduler's planning and the batch build (the host side of a step), the stages' compute (the
forward, sampling included: it runs on the last stage's thread), and output processing
(detokenizing and per-request outputs). The rest of the wall time is the event loop itself:
task switches, thread hand-offs and the streams' consumers.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from streamer.bench.results import LABELS, SystemResult
from streamer.bench.scenarios import engine_kv
from streamer.bench.stats import RequestTiming
from streamer.bench.workload import Workload, warm_up_requests
from streamer.config import EngineConfig
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams
from streamer.protocol import PRIORITIES

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class StepProfile:
    """Seconds spent in each part of the engine loop, summed over the measured run."""

    schedule_s: float = 0.0
    build_s: float = 0.0
    process_s: float = 0.0
    complete_s: float = 0.0
    steps: int = 0
    step_tokens: int = 0
    step_items: int = 0
    peak_running: int = 0
    peak_kv_usage: float = 0.0
    _timers: dict[str, float] = field(default_factory=dict, repr=False)

    def timed(self, name: str, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, name, getattr(self, name) + time.perf_counter() - began)

        return wrapper  # type: ignore[return-value]

    def on_step(self, plan: Any, running: int, kv_usage: float) -> None:
        self.steps += 1
        self.step_tokens += plan.num_tokens
        self.step_items += len(plan.items)
        self.peak_running = max(self.peak_running, running)
        self.peak_kv_usage = max(self.peak_kv_usage, kv_usage)

    def reset(self) -> None:
        self.schedule_s = self.build_s = self.process_s = self.complete_s = 0.0
        self.steps = self.step_tokens = self.step_items = self.peak_running = 0
        self.peak_kv_usage = 0.0

    def to_json(self, wall_s: float, compute_s: float) -> dict[str, Any]:
        host = self.schedule_s + self.build_s + self.complete_s
        other = max(0.0, wall_s - host - compute_s - self.process_s)
        share = (lambda s: s / wall_s if wall_s > 0 else 0.0)  # noqa: E731
        return {
            "wall_s": wall_s, "steps": self.steps,
            "mean_tokens_per_step": self.step_tokens / self.steps if self.steps else 0.0,
            "mean_seqs_per_step": self.step_items / self.steps if self.steps else 0.0,
            "ms_per_step": 1000 * wall_s / self.steps if self.steps else 0.0,
            "seconds": {"schedule+build": host, "stage_compute": compute_s,
                        "output_processing": self.process_s, "loop_other": other},
            "share": {"schedule+build": share(host), "stage_compute": share(compute_s),
                      "output_processing": share(self.process_s), "loop_other": share(other)},
            "detail_s": {"schedule_next": self.schedule_s, "build": self.build_s,
                         "complete": self.complete_s},
            "peak_running": self.peak_running, "peak_kv_usage": self.peak_kv_usage,
        }


def engine_config(model: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                  kv_cache_bytes: int | None, max_model_len: int | None) -> EngineConfig:
    return EngineConfig(model=model, devices=("cpu",), max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        kv_cache_bytes=kv_cache_bytes, max_model_len=max_model_len)


async def run_engine(config: EngineConfig, workload: Workload, *,
                     warmup_requests: int = 4) -> SystemResult:
    """Submit the workload (at its arrival times) to an in-process engine and time it."""
    result = SystemResult("engine", LABELS["engine"])
    profile = StepProfile()
    try:
        async with Engine(config) as engine:
            _instrument(engine, profile)
            await warm_up(engine, workload, warmup_requests)
            profile.reset()
            hits_before = engine.blocks.stats.hit_tokens if engine.blocks else 0
            busy_before = sum(engine.stage_busy_seconds())
            cpu_before = time.process_time()  # every thread of this process
            timings, wall = await drive(engine, workload)
            cpu = time.process_time() - cpu_before
            compute = sum(engine.stage_busy_seconds()) - busy_before
            kv = engine_kv(engine, workload)
            kv["prefix_hit_tokens"] = (engine.blocks.stats.hit_tokens - hits_before
                                       if engine.blocks else None)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.timings = timings
    result.useful_tokens = sum(min(t.tokens, t.requested_tokens) for t in timings if t.ok)
    result.wall_s = wall
    result.details = {"config": {"max_num_seqs": config.max_num_seqs,
                                 "max_num_batched_tokens": config.max_num_batched_tokens,
                                 "kv_cache_bytes": config.kv_cache_bytes,
                                 "max_model_len": config.max_model_len},
                      "completed": sum(t.ok for t in timings), "kv_cache": kv,
                      "cpu": {"wall_s": wall, "process_cpu_s": cpu, "stage_busy_s": compute},
                      "profile": profile.to_json(wall, compute)}
    return result


def _instrument(engine: Engine, profile: StepProfile) -> None:
    """Wrap the loop's parts on this instance only (the engine's code is left as it is)."""
    assert engine.scheduler is not None
    scheduler = engine.scheduler
    scheduler.schedule_next = profile.timed("schedule_s", scheduler.schedule_next)  # type: ignore[method-assign]
    scheduler.complete = profile.timed("complete_s", scheduler.complete)  # type: ignore[method-assign]
    engine._build = profile.timed("build_s", engine._build)  # type: ignore[method-assign]
    engine._process = profile.timed("process_s", engine._process)  # type: ignore[method-assign]
    engine.on_step = lambda plan, _seconds: profile.on_step(
        plan, scheduler.num_running, engine.kv_usage)


async def warm_up(engine: Engine, workload: Workload, count: int) -> None:
    """A few short requests first, so one-off costs (allocator, kernels) are not timed."""
    streams = [engine.add(r.request_id, list(r.prompt_ids),
                          SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
               for r in warm_up_requests(workload, count)]
    for stream in streams:
        async for _ in stream:
            pass


async def drive(engine: Engine, workload: Workload) -> tuple[list[RequestTiming], float]:
    began = time.monotonic()

    async def one(index: int) -> RequestTiming:
        request = workload.requests[index]
        delay = began + request.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        timing = RequestTiming(request.request_id, request.lane, time.monotonic(),
                               request.max_tokens)
        stream = engine.add(request.request_id, list(request.prompt_ids),
                            SamplingParams(max_tokens=request.max_tokens, ignore_eos=True),
                            priority=PRIORITIES.index(request.lane))
        async for out in stream:
            if out.kind is OutputKind.TOKENS and out.token_ids:
                timing.chunks.append((time.monotonic(), len(out.token_ids)))
            elif out.kind is OutputKind.FINISHED:
                timing.finished = time.monotonic()
                timing.outcome = out.finish_reason or ""
                timing.ok = out.error is None and out.finish_reason == "length"
        return timing

    timings = await asyncio.gather(*(one(i) for i in range(len(workload.requests))))
    return list(timings), time.monotonic() - began
