"""The engine: a thin async loop around the pure scheduler and the pipeline stages.

    schedule (up to N micro-batches in flight) -> stages -> sample -> update -> per-request outputs

It is usable without Kafka (`Engine.generate`); the worker wraps `Engine.add`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from streamer.aio import cancel_and_wait
from streamer.config import EngineConfig
from streamer.engine import gate, warmup
from streamer.engine import model as model_lib
from streamer.engine.detokenizer import IncrementalDetokenizer
from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.limits import LimitError
from streamer.engine.loading import load_stages
from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream
from streamer.engine.remote import ModelProcessDied, RemotePipeline
from streamer.engine.sampling import base_seed, sample, token_seed
from streamer.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from streamer.engine.sequence import Resume, SamplingParams, SeqStatus, Sequence
from streamer.engine.stages import Pipeline, StepBatch
from streamer.protocol import ErrorCode

log = structlog.get_logger(__name__)

@dataclass
class Tracked:
    """Engine-side companions of a sequence that the pure scheduler does not need."""

    seq: Sequence
    stream: RequestStream
    detok: IncrementalDetokenizer
    seed: int | None
    """Base seed of the request's draws (None: greedy); token i draws with token_seed(seed, i)."""
    deadline_s: float | None  # epoch seconds
    abort_reason: str | None = None
    first_token_at: float | None = None
    started_announced: bool = False
    carry: str = ""
    """Resumed only: text the earlier attempt held back, prepended to the next chunk."""
    skip: int = 0
    """Resumed only: characters the earlier attempt published that this one has yet to decode."""


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
        self._tracked: dict[str, Tracked] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.last_step_at = time.monotonic()
        self.on_step: Callable[[StepPlan, float], None] | None = None
        self.fatal: BaseException | None = None
        self.oom_retries = 0
        self._steps_since_oom = 0
        self.warming = False
        """Warm-up steps are running (the worker is not ready)."""
        self.gate_held = False
        """Test gate only: the gate holds the engine and no step is in flight (docs/testing.md)."""
        self._gate_rule: gate.GateRule | None = None

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
        seq = Sequence(
            request_id, list(prompt_ids), params, priority=priority, arrival=time.monotonic()
        )
        stream = RequestStream(request_id)
        # Everything that can raise comes before the scheduler sees the sequence.
        tracked = Tracked(
            seq=seq,
            stream=stream,
            detok=IncrementalDetokenizer(self.tokenizer, stop=params.stop),
            seed=base_seed(params),
            deadline_s=deadline_ms / 1000 if deadline_ms is not None else None,
        )
        if resume is not None and resume.token_ids:
            self._resume(tracked, resume)
        self.scheduler.add(seq)
        self._tracked[request_id] = tracked
        self._wakeup.set()
        return stream

    def _resume(self, tracked: Tracked, resume: Resume) -> None:
        """Continue from `resume` when it is a state this request can be in, else start over."""
        seq, params = tracked.seq, tracked.seq.params
        tokens = list(resume.token_ids)
        ended = len(tokens) >= params.max_tokens or (
            not params.ignore_eos and any(t in self.eos_ids for t in tokens)
        )
        detok = IncrementalDetokenizer(self.tokenizer, stop=params.stop)
        detok.push(tokens)
        if ended or detok.stopped:
            log.warning("resume_ignored", request_id=seq.request_id, tokens=len(tokens),
                        reason="the earlier attempt had already ended")
            return
        seq.output_ids = tokens
        tracked.detok = detok
        released = len(detok.text)
        tracked.carry = detok.text[resume.text_chars:]
        tracked.skip = max(0, resume.text_chars - released)
        if resume.seed is not None and params.seed is None and not params.greedy:
            tracked.seed = resume.seed  # the draws of the earlier attempt's random seed
        tracked.stream.resumed_at = len(tokens)

    def seed_of(self, request_id: str) -> int | None:
        """The base seed of a tracked request's draws (recorded with its progress)."""
        tracked = self._tracked.get(request_id)
        return tracked.seed if tracked is not None else None

    def abort(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stop a request wherever it is; it finishes with `reason`. False if unknown."""
        tracked = self._tracked.get(request_id)
        if tracked is None or self.scheduler is None:
            return False
        if self.scheduler.is_in_flight(tracked.seq):
            tracked.abort_reason = reason  # finished when its micro-batch comes back
        else:
            self._finish(tracked, SeqStatus.FINISHED_ABORTED, reason)
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
        return request_id in self._tracked

    @property
    def num_requests(self) -> int:
        return len(self._tracked)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        assert self.scheduler is not None and self.pipeline is not None
        scheduler, pipeline = self.scheduler, self.pipeline
        in_flight: deque[StepPlan] = deque()
        try:
            while True:
                pipeline.check()  # a dead model process is noticed idle too, within a second
                self._expire_deadlines()
                held = self._gate_holds()
                while not held and len(in_flight) < pipeline.depth:
                    plan = scheduler.schedule_next(time.monotonic())
                    if plan is None:
                        break
                    self._announce(plan)
                    if plan.items:
                        await pipeline.submit(self._build(plan))
                        in_flight.append(plan)
                if not in_flight:
                    self._wakeup.clear()
                    if held:
                        self._report_gate_held()
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
                if isinstance(result, BaseException) and self._retry_smaller(plan, result):
                    self._finish_pending_aborts(plan)
                    continue
                scheduler.complete(plan, ok=not isinstance(result, BaseException))
                self._process(plan, result)
                self._relax_step_cap()
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
            for tracked in list(self._tracked.values()):
                self._finish(tracked, SeqStatus.FINISHED_ABORTED, reason, error=repr(exc))
            raise

    # ------------------------------------------------------------------ the test gate

    def _gate_holds(self) -> bool:
        """Whether the test gate holds the next step; False at once when no gate is configured."""
        if self.config.test_gate is None:
            return False
        self._gate_rule = gate.read_rule(self.config.test_gate)
        held = self._gate_rule is not None and self._gate_rule.holds(self._max_output_tokens())
        if not held and self.gate_held:
            self.gate_held = False
            log.info("test_gate_released", rule=str(self._gate_rule or "absent"))
        return held

    def _report_gate_held(self) -> None:
        """Held with nothing in flight: until the gate opens, no request changes."""
        if self.gate_held:
            return
        self.gate_held = True
        log.info(
            "test_gate_held",
            rule=str(self._gate_rule),
            requests=len(self._tracked),
            max_output_tokens=self._max_output_tokens(),
        )

    def _max_output_tokens(self) -> int:
        return max((len(t.seq.output_ids) for t in self._tracked.values()), default=0)

    def _retry_smaller(self, plan: StepPlan, error: BaseException) -> bool:
        """A failed step of several sequences runs again in smaller steps.

        Out of memory halves the sequences per step; any other error runs them one at a time, so
        a fault that one request triggers fails that request alone. A single-sequence step that
        fails is final (False)."""
        assert self.scheduler is not None
        if len(plan.items) <= 1:
            return False
        oom = isinstance(error, (torch.OutOfMemoryError, MemoryError))
        self.scheduler.abandon(plan)
        self.scheduler.step_cap = max(1, len(plan.items) // 2) if oom else 1
        self._steps_since_oom = 0
        self.oom_retries += oom
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning(
            "step_failed_retrying_smaller",
            error=repr(error)[:300],
            sequences=len(plan.items),
            step_cap=self.scheduler.step_cap,
        )
        return True

    def _finish_pending_aborts(self, plan: StepPlan) -> None:
        """A step given up for a retry: its sequences aborted meanwhile end now, not after it."""
        for item in plan.items:
            tracked = self._tracked[item.seq.request_id]
            if tracked.abort_reason is not None:
                self._finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)

    def _relax_step_cap(self) -> None:
        """After a run of good steps, double the cap again until it is gone."""
        scheduler = self.scheduler
        if scheduler is None or scheduler.step_cap is None:
            return
        self._steps_since_oom += 1
        if self._steps_since_oom >= 16:
            self._steps_since_oom = 0
            doubled = scheduler.step_cap * 2
            scheduler.step_cap = None if doubled >= self.config.max_num_seqs else doubled

    def _announce(self, plan: StepPlan) -> None:
        for seq in plan.preempted:
            tracked = self._tracked[seq.request_id]
            tracked.stream.put(RequestOutput(seq.request_id, OutputKind.PREEMPTED))
        for item in plan.items:
            tracked = self._tracked[item.seq.request_id]
            if not tracked.started_announced:
                tracked.started_announced = True
                tracked.stream.put(
                    RequestOutput(
                        item.seq.request_id, OutputKind.STARTED, started_at=time.monotonic()
                    )
                )

    def _build(self, plan: StepPlan) -> StepBatch:
        assert self.blocks is not None
        ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[tuple[int, ...]] = []
        sample_rows: list[int] = []
        params: list[SamplingParams] = []
        seeds: list[int | None] = []
        row = 0
        for item in plan.items:
            seq, start, num = item.seq, item.start, item.num_tokens
            ids.extend(token_slice(seq, start, num))
            query_lens.append(num)
            context_lens.append(start + num)
            tables.append(self.blocks.block_table(seq.request_id))
            if item.sample:
                sample_rows.append(row + num - 1)
                params.append(seq.params)
                seed = self._tracked[seq.request_id].seed
                seeds.append(None if seed is None else token_seed(seed, len(seq.output_ids)))
            row += num
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return StepBatch(
            input_ids=as_long(ids),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            sample_rows=as_long(sample_rows),
            sampler=functools.partial(sample, params=params, seeds=seeds),  # picklable
        )

    def _process(self, plan: StepPlan, result: list[int] | BaseException) -> None:
        """The one place that turns a step's sampled tokens into per-request outputs.

        Every item's sequence is still tracked: a sequence in flight is only marked for abort
        (`abort_reason`) and finishes here, with that reason even when the step failed."""
        if isinstance(result, BaseException):
            log.error("step_failed", error=repr(result), sequences=len(plan.items))
            for item in plan.items:
                tracked = self._tracked[item.seq.request_id]
                if tracked.abort_reason is not None:
                    self._finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)
                else:
                    self._finish(tracked, SeqStatus.FINISHED_ABORTED, "failed", error=repr(result))
            return
        tokens = iter(result)
        now = time.monotonic()
        for item in plan.items:
            token = next(tokens) if item.sample else None
            tracked = self._tracked[item.seq.request_id]
            if tracked.abort_reason is not None:
                self._finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)
            elif token is not None:
                self._append(tracked, token, now)

    def _append(self, tracked: Tracked, token: int, now: float) -> None:
        seq = tracked.seq
        index = len(seq.output_ids)
        seq.output_ids.append(token)
        if tracked.first_token_at is None:
            tracked.first_token_at = now
        text = tracked.detok.push([token])
        status: SeqStatus | None = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            status = SeqStatus.FINISHED_EOS
        elif tracked.detok.stopped:
            status = SeqStatus.FINISHED_STOPPED
        elif len(seq.output_ids) >= seq.params.max_tokens:
            status = SeqStatus.FINISHED_LENGTH
        if status is not None:
            text += tracked.detok.finish()
            if tracked.detok.stopped:  # an overlapping stop can be confirmed only by finish()
                status = SeqStatus.FINISHED_STOPPED
        if tracked.carry or tracked.skip:  # a resumed attempt lines its text up with the old one
            text = tracked.carry + text
            cut = min(tracked.skip, len(text))
            text, tracked.carry, tracked.skip = text[cut:], "", tracked.skip - cut
        tracked.stream.put(
            RequestOutput(
                seq.request_id, OutputKind.TOKENS, index=index, token_ids=[token], text=text
            )
        )
        if status is not None:
            self._finish(tracked, status, _REASONS[status])

    def _finish(
        self, tracked: Tracked, status: SeqStatus, reason: str, error: str | None = None
    ) -> None:
        seq = tracked.seq
        if self._tracked.pop(seq.request_id, None) is None:
            return
        assert self.scheduler is not None
        self.scheduler.finish(seq, status)
        if status is SeqStatus.FINISHED_ABORTED:
            tracked.detok.finish()
        tracked.stream.put(
            RequestOutput(
                seq.request_id,
                OutputKind.FINISHED,
                finish_reason=reason,
                final_text=tracked.detok.text,
                num_prompt_tokens=len(seq.prompt_ids),
                num_completion_tokens=len(seq.output_ids),
                error=error,
                first_token_at=tracked.first_token_at,
                started_at=seq.started_at,
            )
        )

    def _expire_deadlines(self) -> None:
        now = time.time()
        expired = [
            t.seq.request_id
            for t in self._tracked.values()
            if t.deadline_s is not None and now > t.deadline_s and t.abort_reason is None
        ]
        for request_id in expired:
            self.abort(request_id, "expired")


_REASONS = {
    SeqStatus.FINISHED_EOS: "eos",
    SeqStatus.FINISHED_STOPPED: "stop",
    SeqStatus.FINISHED_LENGTH: "length",
}


def token_slice(seq: Sequence, start: int, num: int) -> list[int]:
    """Tokens [start, start + num) of prompt + output, without joining the two lists."""
    prompt_len = len(seq.prompt_ids)
    if start >= prompt_len:
        return seq.output_ids[start - prompt_len : start - prompt_len + num]
    end = start + num
    if end <= prompt_len:
        return seq.prompt_ids[start:end]
    return seq.prompt_ids[start:] + seq.output_ids[: end - prompt_len]
