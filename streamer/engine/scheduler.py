"""The scheduler: pure, synchronous, no I/O. It decides what runs in each engine step.

Rules (docs/architecture.md explains them):
- Sequences are split into `num_groups` micro-batch groups, one per pipeline stage, so that N
  micro-batches can be in flight at once. A sequence stays in its group; each group owns a
  contiguous range of KV-cache slots, so a group's decode attention reads one slice of the cache.
- Each step of a group: running sequences first (priority, then arrival), each runs either one
  decode token or the next chunk of its prompt; then waiting sequences are admitted while a slot,
  `max_num_seqs` and the token budget `max_num_batched_tokens` allow.
- Waiting order: strict priority across lanes, FIFO within a lane; a request that has waited
  `aging_s` seconds counts one lane higher (repeatedly) and takes its place in that lane by
  arrival, so low lanes are never starved forever.
- Preemption: when the next waiting request finds no slot and some running sequence of the group
  is in a strictly lower lane (by lane, not aged), the lowest-lane, most recently started one is
  preempted: slot freed, prefix recomputed on resume. Aging orders the queue; it never preempts,
  and it shields: a sequence whose aged lane is not strictly below the waiter's aged lane would
  queue ahead of the waiter again, so it is not preempted for it (no thrashing, no starvation).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamer.engine.sequence import SeqStatus, Sequence

NUM_LANES = 4


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    """Running sequences at most, across all groups."""
    max_num_batched_tokens: int = 512
    """Tokens in one step of one group (decode tokens + prefill chunks)."""
    num_slots: int = 32
    """KV-cache slots (each holds max_model_len tokens)."""
    num_groups: int = 1
    """Micro-batch groups = pipeline stages."""
    aging_s: float = 30.0
    """Seconds of waiting that lift a request one lane; 0 disables aging."""
    preemption: bool = True

    def validate(self) -> None:
        if self.num_groups < 1 or self.num_slots < self.num_groups:
            raise ValueError(
                f"num_slots={self.num_slots} must be >= num_groups={self.num_groups} >= 1 "
                "(raise the KV-cache budget or use fewer stages)"
            )
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(
                f"max_num_seqs={self.max_num_seqs} and max_num_batched_tokens="
                f"{self.max_num_batched_tokens} must be >= 1"
            )
        if self.aging_s < 0:
            raise ValueError(f"aging_s={self.aging_s} must be >= 0")


@dataclass
class ScheduledItem:
    seq: Sequence
    start: int
    """Position of the first token run this step (= tokens already in the cache)."""
    num_tokens: int
    sample: bool
    """Whether this step ends at the sequence's last token, so a new token is sampled."""


@dataclass
class StepPlan:
    group: int
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        config.validate()
        self.config = config
        self.waiting: list[deque[Sequence]] = [deque() for _ in range(NUM_LANES)]
        self.running: list[list[Sequence]] = [[] for _ in range(config.num_groups)]
        self.in_flight: set[int] = set()
        per_group = config.num_slots // config.num_groups
        self._free_slots = [
            list(range(g * per_group, (g + 1) * per_group)) for g in range(config.num_groups)
        ]
        self._slots_per_group = per_group
        self._by_id: dict[str, Sequence] = {}
        self._next_group = 0
        self.step_cap: int | None = None
        """Most sequences per step while backing off after out-of-memory (None: no cap)."""

    # ---------------------------------------------------------------- queries

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    @property
    def num_waiting(self) -> int:
        return sum(len(lane) for lane in self.waiting)

    def num_waiting_in(self, lane: int) -> int:
        return len(self.waiting[lane])

    @property
    def num_running(self) -> int:
        return sum(len(group) for group in self.running)

    @property
    def has_work(self) -> bool:
        return self.num_waiting > 0 or self.num_running > 0

    @property
    def slots_per_group(self) -> int:
        return self._slots_per_group

    def slots_in_use(self) -> int:
        return self.config.num_slots - sum(len(free) for free in self._free_slots)

    def sequences(self) -> Iterator[Sequence]:
        yield from self._by_id.values()

    # ---------------------------------------------------------------- changes

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if not 0 <= seq.priority < NUM_LANES:
            raise ValueError(f"priority {seq.priority} is not a lane (0..{NUM_LANES - 1})")
        seq.status = SeqStatus.WAITING
        self.waiting[seq.priority].append(seq)
        self._by_id[seq.request_id] = seq

    def finish(self, seq: Sequence, status: SeqStatus) -> None:
        """Remove a sequence for good and free its slot (it must not be in flight)."""
        assert status.is_finished, status
        if self._by_id.pop(seq.request_id, None) is None:
            return
        if seq.group is not None:
            self.running[seq.group].remove(seq)
            self._release_slot(seq)
        else:
            self.waiting[seq.priority].remove(seq)
        seq.status = status

    def is_in_flight(self, seq: Sequence) -> bool:
        return seq.slot is not None and seq.group in self.in_flight

    def schedule_next(self, now: float) -> StepPlan | None:
        """Plan a step for the next group that is not in flight and has work, if any."""
        for offset in range(self.config.num_groups):
            group = (self._next_group + offset) % self.config.num_groups
            if group in self.in_flight:
                continue
            plan = self.schedule(group, now)
            if plan is not None:
                self._next_group = (group + 1) % self.config.num_groups
                return plan
        return None

    def schedule(self, group: int, now: float) -> StepPlan | None:
        assert group not in self.in_flight, f"group {group} is already in flight"
        plan = StepPlan(group)
        budget = self.config.max_num_batched_tokens
        # Decodes first (one token each, they keep streams flowing), then prefill chunks by lane.
        order = sorted(self.running[group],
                       key=lambda s: (s.num_uncomputed > 1, s.priority, s.arrival))
        # The out-of-memory cap only; max_num_seqs is enforced by admission (and preemption).
        cap = self.step_cap
        for seq in order:
            if budget == 0 or (cap is not None and len(plan.items) >= cap):
                break
            budget -= self._plan_item(plan, seq, budget)
        while budget > 0 and (cap is None or len(plan.items) < cap):
            seq = self._peek_waiting(now)
            if seq is None:
                break
            if not self._has_room(group) and not self._preempt_for(seq, plan, now):
                break
            self._pop_waiting(seq)
            self._admit(seq, group, now)
            self._plan_item(plan, seq, budget)
            # Recomputed rather than decremented: a preemption may have dropped a planned item.
            budget = self.config.max_num_batched_tokens - plan.num_tokens
        if not plan.items:
            # Preemptions without a step can happen only when nothing could run; keep them.
            return plan if plan.preempted else None
        self.in_flight.add(group)
        return plan

    def abandon(self, plan: StepPlan) -> None:
        """The step failed without effect (e.g. out of memory): its items will be planned again.

        Their `num_computed` was never advanced, so the retry rewrites the same cache positions."""
        self.in_flight.discard(plan.group)

    def complete(self, plan: StepPlan) -> None:
        """The step ran: its tokens are in the cache. Sampled tokens are appended by the caller."""
        self.in_flight.discard(plan.group)
        for item in plan.items:
            item.seq.num_computed = item.start + item.num_tokens

    # ---------------------------------------------------------------- internals

    def _plan_item(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        num = min(seq.num_uncomputed, budget)
        if num <= 0:
            return 0
        plan.items.append(
            ScheduledItem(seq, seq.num_computed, num, sample=num == seq.num_uncomputed)
        )
        return num

    def _has_room(self, group: int) -> bool:
        return bool(self._free_slots[group]) and self.num_running < self.config.max_num_seqs

    def _effective_lane(self, seq: Sequence, now: float) -> int:
        if self.config.aging_s <= 0:
            return seq.priority
        lifted = math.floor(max(0.0, now - seq.arrival) / self.config.aging_s)
        return max(0, seq.priority - lifted)

    def _peek_waiting(self, now: float) -> Sequence | None:
        heads = [lane[0] for lane in self.waiting if lane]
        if not heads:
            return None
        # FIFO within the aged lane: a lifted request is not put behind that lane's own requests
        # (it would be, forever, under a steady overload of that lane).
        return min(heads, key=lambda s: (self._effective_lane(s, now), s.arrival, s.priority))

    def _pop_waiting(self, seq: Sequence) -> None:
        popped = self.waiting[seq.priority].popleft()
        assert popped is seq

    def _admit(self, seq: Sequence, group: int, now: float) -> None:
        seq.slot = heapq.heappop(self._free_slots[group])
        seq.group = group
        seq.status = SeqStatus.RUNNING
        if seq.started_at is None:
            seq.started_at = now
        self.running[group].append(seq)

    def _release_slot(self, seq: Sequence) -> None:
        assert seq.slot is not None and seq.group is not None
        heapq.heappush(self._free_slots[seq.group], seq.slot)
        seq.slot = None
        seq.group = None

    def _preempt_for(self, waiter: Sequence, plan: StepPlan, now: float) -> bool:
        """Free a slot in plan.group for `waiter` by preempting a lower-lane sequence."""
        if not self.config.preemption:
            return False
        lane = self._effective_lane(waiter, now)
        candidates = [
            s
            for s in self.running[plan.group]
            if s.priority > waiter.priority and self._effective_lane(s, now) > lane
        ]
        if not candidates:
            return False
        victim = max(candidates, key=lambda s: (s.priority, s.started_at or 0.0, s.arrival))
        planned = [i for i in plan.items if i.seq is victim]
        for item in planned:
            plan.items.remove(item)
        self.running[plan.group].remove(victim)
        self._release_slot(victim)
        victim.status = SeqStatus.PREEMPTED
        victim.num_computed = 0
        victim.num_preemptions += 1
        # Front of its lane: it was admitted before everything still waiting there.
        self.waiting[victim.priority].appendleft(victim)
        plan.preempted.append(victim)
        return bool(self._free_slots[plan.group]) and (
            self.num_running < self.config.max_num_seqs
        )
