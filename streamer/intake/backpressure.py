"""When intake pauses: a pure decision over queue depths and unacknowledged outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backpressure:
    """Pause a lane while its waiting queue is full; pause every lane while the broker holds back
    too many outputs, so a stalled broker cannot grow the worker's memory. Both resume below
    half their limit, so they do not flap."""

    lane_capacity: int
    max_outstanding_outputs: int
    outputs_blocked: bool = False
    output_pauses: int = 0
    paused: set[int] = field(default_factory=set)

    def decide(self, waiting: list[int], outstanding: int) -> tuple[set[int], set[int]]:
        """Given waiting requests per lane and unacknowledged outputs: (lanes to pause, to resume).
        """
        limit = self.max_outstanding_outputs
        if not self.outputs_blocked and outstanding >= limit:
            self.outputs_blocked = True
            self.output_pauses += 1
        elif self.outputs_blocked and outstanding < limit // 2:
            self.outputs_blocked = False
        # A paused lane resumes below half its capacity, so it does not flap at the limit.
        resume_below = max(1, self.lane_capacity // 2)
        full = {
            lane for lane, n in enumerate(waiting)
            if self.outputs_blocked or n >= self.lane_capacity
            or (lane in self.paused and n >= resume_below)
        }
        pause, resume = full - self.paused, self.paused - full
        self.paused = full
        return pause, resume
