"""The engine: a thin async loop around the pure scheduler and the pipeline stages.

    schedule (up to N micro-batches in flight) -> stages -> sample -> update -> per-request outputs

It is usable without Kafka (`Engine.generate`); the worker wraps `Engine.add`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from streamer.aio import cancel_and_wait
from streamer.config import EngineConfig
from streamer.engine import gate, warmup
from streamer.engine import model as model_lib
from streamer.engine.batch import build_batch
from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.limits import LimitError
from streamer.engine.loading import load_stages
from streamer.engine.outputs import RequestOutput, RequestStream
from streamer.engine.remote import ModelProcessDied, RemotePipeline
from streamer.engine.request_table import RequestTable
from streamer.engine.retry import StepRetry
from streamer.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from streamer.engine.sequence import Resume, SamplingParams, Sequence
from streamer.engine.stages import Pipeline, StepBatch
from streamer.protocol import ErrorCode

log = structlog.get_logger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.tokenizer: Any = None
        self.shape: model_lib.ModelShape | None = None
        self.scheduler: Scheduler | None = None
        self.pipeline: Pipeline | RemotePipeline | None = None
        self.max_model_len = 0
        self.blocks: BlockManager | None = None
        """The one owner of KV memory (blocks shared by every stage's pool)."""
        self.eos_ids: frozenset[int] = frozenset()
        self._requests: RequestTable | None = None
        """The requests the engine holds (with the scheduler: None until started)."""
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.last_step_at = time.monotonic()
        self.on_step: Callable[[StepPlan, float], None] | None = None
        self.fatal: BaseException | None = None
        self._retry = StepRetry(config.max_num_seqs)
        self.warming = False
        """Warm-up steps are running (the worker is not ready)."""
        self._gate = gate.Gate(config.test_gate)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Engine:
        if self._task is not None:
            return self
        await asyncio.to_thread(self._load)
        assert self.pipeline is not None
        if self.config.test_gate is not None:
            log.warning(
                "test_gate_configured",
                path=self.config.test_gate,
                note="test-only: engine steps wait on this file; production never sets it",
            )
        await self.pipeline.start()
        await warmup.run(self)  # before the first real step: nothing else uses the pool yet
        self._task = asyncio.create_task(self._run(), name="engine-loop")
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self.pipeline is not None:
            await self.pipeline.stop()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _load(self) -> None:
        cfg = self.config
        if cfg.model_process:  # weights, KV pools and stages live in a process of their own
            remote = RemotePipeline.launch(cfg)
            try:  # the tokenizer loads here while the model loads there
                self.tokenizer = model_lib.load_tokenizer(cfg.model)
                summary = remote.wait_loaded()
            except BaseException:
                remote.kill()
                raise
            self.pipeline = remote
        else:
            self.tokenizer = model_lib.load_tokenizer(cfg.model)
            stages, summary = load_stages(cfg)
            self.pipeline = Pipeline(stages)
        shape = self.shape = summary.shape
        self.max_model_len = min(cfg.max_model_len or shape.context_length, shape.context_length)
        eos = self.tokenizer.eos_token_id
        default = frozenset() if eos is None else frozenset([eos])
        self.eos_ids = summary.eos_ids if summary.eos_ids is not None else default
        self.blocks = BlockManager(summary.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                num_groups=len(cfg.devices),
                aging_s=cfg.aging_s,
                preemption=cfg.preemption,
            ),
            self.blocks,
        )
        self._requests = RequestTable(self.scheduler, self.tokenizer, self.eos_ids)
        log.info(
            "engine_loaded",
            model=cfg.model,
            model_type=shape.model_type,
            dtype=summary.dtype,
            stages=[
                f"{d}:{r.start}-{r.stop - 1}"
                for d, r in zip(cfg.devices, summary.ranges, strict=True)
            ],
            model_process=self.model_pid,
            kv_blocks=summary.num_blocks,
            kv_block_size=cfg.block_size,
            kv_bytes=summary.bytes_per_block * summary.num_blocks,
            kv_tokens=summary.num_blocks * cfg.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
        )

    # ------------------------------------------------------------------ requests

    @property
    def oom_retries(self) -> int:
        """Failed steps run again in smaller steps because memory ran out."""
        return self._retry.oom_retries

    @property
    def gate_held(self) -> bool:
        """Test gate only: the gate holds the engine and no step is in flight (docs/testing.md)."""
        return self._gate.held

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by sequences (idle prefix-cached blocks count as free)."""
        return self.blocks.stats.usage if self.blocks is not None else 0.0

    def stage_activity(self) -> list[str]:
        """What each stage is doing right now (for the stall watchdog's log line)."""
        return [s.current for s in self.pipeline.stages] if self.pipeline else []

    @property
    def model_pid(self) -> int | None:
        """The model process's pid; None when the stages run on this process's threads."""
        return self.pipeline.pid if self.pipeline is not None else None

    def stage_busy_seconds(self) -> list[float]:
        return [s.busy_seconds for s in self.pipeline.stages] if self.pipeline else []

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 2,
        deadline_ms: int | None = None,
        resume: Resume | None = None,
    ) -> RequestStream:
        """Queue a tokenized request; its outputs arrive on the returned stream.

        With `resume` the sequence continues where an earlier attempt stopped: its tokens are
        prefilled with the prompt and the first new token has index len(resume.token_ids)
        (`stream.resumed_at`). A resume that cannot be continued (it already ended) is ignored
        and the request starts from token 0 (`stream.resumed_at == 0`)."""
        assert self.scheduler is not None, "engine not started"
        if self.fatal is not None:
            raise RuntimeError(f"engine stopped after a fatal error: {self.fatal}")
        if not prompt_ids:
            raise ValueError("prompt must have at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}"
            )
        assert self.blocks is not None
        wanted = self.blocks.blocks_for(len(prompt_ids) + params.max_tokens)
        if wanted > self.blocks.num_blocks:
            raise LimitError(
                ErrorCode.KV_BUDGET_EXCEEDED,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                f"{wanted} KV blocks of {self.blocks.block_size} tokens; the whole cache has "
                f"{self.blocks.num_blocks} (raise kv_cache_bytes)",
            )
        assert self._requests is not None
        seq = Sequence(
            request_id, list(prompt_ids), params, priority=priority, arrival=time.monotonic()
        )
        stream = self._requests.add(seq, deadline_ms, resume)
        self._wakeup.set()
        return stream

    def seed_of(self, request_id: str) -> int | None:
        """The base seed of a tracked request's draws (recorded with its progress)."""
        return self._requests.seed_of(request_id) if self._requests is not None else None

    def abort(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stop a request wherever it is; it finishes with `reason`. False if unknown."""
        if self._requests is None or not self._requests.abort(request_id, reason):
            return False
        self._wakeup.set()
        return True

    async def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 2,
    ) -> AsyncIterator[RequestOutput]:
        """In-process API: tokenize `prompt` as `tokenizer(prompt)` does and stream outputs."""
        params = params or SamplingParams()
        ids = self.tokenizer(prompt).input_ids
        stream = self.add(
            request_id or f"gen-{id(params)}-{time.monotonic_ns()}", ids, params, priority=priority
        )
        async for output in stream:
            yield output

    def has_request(self, request_id: str) -> bool:
        return self._requests is not None and request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests) if self._requests is not None else 0

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        assert self.scheduler is not None and self.pipeline is not None
        assert self._requests is not None
        scheduler, pipeline, requests = self.scheduler, self.pipeline, self._requests
        in_flight: deque[StepPlan] = deque()
        try:
            while True:
                pipeline.check()  # a dead model process is noticed idle too, within a second
                requests.expire_deadlines()
                held = self._gate.holds(requests.max_output_tokens)
                while not held and len(in_flight) < pipeline.depth:
                    plan = scheduler.schedule_next(time.monotonic())
                    if plan is None:
                        break
                    requests.announce(plan)
                    if plan.items:
                        await pipeline.submit(self._build(plan))
                        in_flight.append(plan)
                if not in_flight:
                    self._wakeup.clear()
                    if held:
                        self._gate.report_held(len(requests), requests.max_output_tokens)
                        await asyncio.sleep(gate.POLL_S)
                    elif not scheduler.has_work:
                        # Wake for new work, or once a second to check deadlines.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                    # Idle time is not a stall: the watchdog measures from here.
                    self.last_step_at = time.monotonic()
                    continue
                began = time.monotonic()
                _, result = await pipeline.result()
                plan = in_flight.popleft()
                if isinstance(result, BaseException) and self._retry.retry_smaller(
                    scheduler, plan, result
                ):
                    requests.finish_pending_aborts(plan)
                    continue
                scheduler.complete(plan, ok=not isinstance(result, BaseException))
                self._process(plan, result)
                self._retry.relax(scheduler)
                self.steps += 1
                self.last_step_at = time.monotonic()
                if self.on_step is not None:
                    self.on_step(plan, self.last_step_at - began)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the loop itself broke: fail every request loudly
            self.fatal = exc
            log.exception("engine_loop_failed")
            # A dead model process is this worker's fault, not the requests': hand them back
            # (no outcome, offsets uncommitted) so the fleet resumes them from their progress.
            reason = "revoked" if isinstance(exc, ModelProcessDied) else "failed"
            requests.finish_all(reason, error=repr(exc))
            raise

    # The loop calls these two through the instance: benchmarks wrap them there to time them.

    def _build(self, plan: StepPlan) -> StepBatch:
        assert self.blocks is not None and self._requests is not None
        return build_batch(plan, self.blocks, self._requests)

    def _process(self, plan: StepPlan, result: list[int] | BaseException) -> None:
        assert self._requests is not None
        self._requests.process(plan, result)
