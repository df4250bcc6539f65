"""What the engine does when a step fails: run its sequences again in smaller steps.

The cap itself is the scheduler's (`Scheduler.step_cap`); this policy only decides when to
lower it and when to raise it again, so the scheduler stays free of error handling.
"""

from __future__ import annotations

import structlog
import torch

from streamer.engine.scheduler import Scheduler, StepPlan

log = structlog.get_logger(__name__)

RELAX_AFTER = 16
"""Good steps in a row after which the step cap doubles."""


class StepRetry:
    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.oom_retries = 0
        self._steps_since_oom = 0

    def retry_smaller(self, scheduler: Scheduler, plan: StepPlan, error: BaseException) -> bool:
        """A failed step of several sequences runs again in smaller steps.

        Out of memory halves the sequences per step; any other error runs them one at a time, so
        a fault that one request triggers fails that request alone. A single-sequence step that
        fails is final (False)."""
        if len(plan.items) <= 1:
            return False
        oom = isinstance(error, (torch.OutOfMemoryError, MemoryError))
        scheduler.abandon(plan)
        scheduler.step_cap = max(1, len(plan.items) // 2) if oom else 1
        self._steps_since_oom = 0
        self.oom_retries += oom
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning(
            "step_failed_retrying_smaller",
            error=repr(error)[:300],
            sequences=len(plan.items),
            step_cap=scheduler.step_cap,
        )
        return True

    def relax(self, scheduler: Scheduler) -> None:
        """After a run of good steps, double the cap again until it is gone."""
        if scheduler.step_cap is None:
            return
        self._steps_since_oom += 1
        if self._steps_since_oom >= RELAX_AFTER:
            self._steps_since_oom = 0
            doubled = scheduler.step_cap * 2
            scheduler.step_cap = None if doubled >= self.max_num_seqs else doubled
