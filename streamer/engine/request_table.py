"""The engine's per-request bookkeeping: the requests it holds and everything they emit.

The pure scheduler knows sequences; this table pairs each with its stream, detokenizer, seed and
deadline, and is the one place that turns a step's sampled tokens into per-request outputs
(started, tokens, preempted, finished). It owns the set of requests the engine holds: a request
leaves it exactly once, in `finish`, which also takes it out of the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from streamer.engine.detokenizer import IncrementalDetokenizer
from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream
from streamer.engine.sampling import base_seed
from streamer.engine.scheduler import Scheduler, StepPlan
from streamer.engine.sequence import Resume, SeqStatus, Sequence

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


class RequestTable:
    def __init__(self, scheduler: Scheduler, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._tracked: dict[str, Tracked] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def __getitem__(self, request_id: str) -> Tracked:
        return self._tracked[request_id]

    # ------------------------------------------------------------------ entering and leaving

    def add(
        self, seq: Sequence, deadline_ms: int | None, resume: Resume | None
    ) -> RequestStream:
        """Track `seq` (already validated) and hand it to the scheduler."""
        params = seq.params
        stream = RequestStream(seq.request_id)
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
        self._tracked[seq.request_id] = tracked
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
        tracked = self._tracked.get(request_id)
        return tracked.seed if tracked is not None else None

    def abort(self, request_id: str, reason: str) -> bool:
        """Finish a request with `reason` now, or mark it when its micro-batch is out (it then
        finishes when the batch comes back). False if unknown."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return False
        if self.scheduler.is_in_flight(tracked.seq):
            tracked.abort_reason = reason
        else:
            self.finish(tracked, SeqStatus.FINISHED_ABORTED, reason)
        return True

    def expire_deadlines(self) -> None:
        now = time.time()
        expired = [
            t.seq.request_id
            for t in self._tracked.values()
            if t.deadline_s is not None and now > t.deadline_s and t.abort_reason is None
        ]
        for request_id in expired:
            self.abort(request_id, "expired")

    def finish_all(self, reason: str, error: str) -> None:
        """The loop itself broke: every request ends now."""
        for tracked in list(self._tracked.values()):
            self.finish(tracked, SeqStatus.FINISHED_ABORTED, reason, error=error)

    def finish_pending_aborts(self, plan: StepPlan) -> None:
        """A step given up for a retry: its sequences aborted meanwhile end now, not after it."""
        for item in plan.items:
            tracked = self._tracked[item.seq.request_id]
            if tracked.abort_reason is not None:
                self.finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)

    def finish(
        self, tracked: Tracked, status: SeqStatus, reason: str, error: str | None = None
    ) -> None:
        seq = tracked.seq
        if self._tracked.pop(seq.request_id, None) is None:
            return
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

    # ------------------------------------------------------------------ a step's outputs

    def announce(self, plan: StepPlan) -> None:
        """A plan was made: its preempted sequences and first-scheduled ones say so."""
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

    def process(self, plan: StepPlan, result: list[int] | BaseException) -> None:
        """The one place that turns a step's sampled tokens into per-request outputs.

        Every item's sequence is still tracked: a sequence in flight is only marked for abort
        (`abort_reason`) and finishes here, with that reason even when the step failed."""
        if isinstance(result, BaseException):
            log.error("step_failed", error=repr(result), sequences=len(plan.items))
            for item in plan.items:
                tracked = self._tracked[item.seq.request_id]
                if tracked.abort_reason is not None:
                    self.finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)
                else:
                    self.finish(tracked, SeqStatus.FINISHED_ABORTED, "failed", error=repr(result))
            return
        tokens = iter(result)
        now = time.monotonic()
        for item in plan.items:
            token = next(tokens) if item.sample else None
            tracked = self._tracked[item.seq.request_id]
            if tracked.abort_reason is not None:
                self.finish(tracked, SeqStatus.FINISHED_ABORTED, tracked.abort_reason)
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
            self.finish(tracked, status, _REASONS[status])

    def max_output_tokens(self) -> int:
        return max((len(t.seq.output_ids) for t in self._tracked.values()), default=0)


_REASONS = {
    SeqStatus.FINISHED_EOS: "eos",
    SeqStatus.FINISHED_STOPPED: "stop",
    SeqStatus.FINISHED_LENGTH: "length",
}
