"""The scheduler: pure, synchronous, no I/O. It decides what runs in each engine step.

Rules (docs/architecture.md explains them):
- KV memory is the engine's one `BlockManager` (paged, prefix-cached): a sequence holds blocks
  for the tokens it has, not a `max_model_len` reservation. Admission asks `can_allocate`; a
  decode asks `can_append` for the slot of the token it sampled last step.
- Sequences are split into `num_groups` micro-batch groups, one per pipeline stage, so that N
  micro-batches can be in flight at once. A sequence stays in its group while it runs (so it is
  never in two micro-batches at once); a group runs at most ceil(max_num_seqs / num_groups) of them.
- Each step of a group: running sequences first (priority, then arrival), each runs either one
  decode token or the next chunk of its prompt; then waiting sequences are admitted while blocks,
  `max_num_seqs` and the token budget `max_num_batched_tokens` allow. Prefill starts after the
  prompt's cached prefix (the count `allocate` returns).
- Out of blocks for a decode: the lowest-lane, most recently started running sequence that is not
  in flight is preempted (recompute: blocks freed, back to the front of its lane), until the slot
  fits; that may be the decoding sequence itself.
- Waiting order: strict priority across lanes, FIFO within a lane; a request that has waited
  `aging_s` seconds counts one lane higher (repeatedly) and takes its place in that lane by
  arrival, so low lanes are never starved forever.
- Priority preemption: when the next waiting request finds no room and some running sequence of
  the group is in a strictly lower lane (by lane, not aged), the lowest-lane, most recently
  started ones are preempted until it fits. Aging orders the queue; it never preempts, and it
  shields: a sequence whose aged lane is not strictly below the waiter's aged lane would queue
  ahead of the waiter again, so it is not preempted for it (no thrashing, no starvation).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.sequence import SeqStatus, Sequence

NUM_LANES = 4


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Running sequences at most, across all groups."""
    max_num_batched_tokens: int = 512
    """Tokens in one step of one group (decode tokens + prefill chunks)."""
    num_groups: int = 1
    """Micro-batch groups = pipeline stages."""
    aging_s: float = 30.0
    """Seconds of waiting that lift a request one lane; 0 disables aging."""
    preemption: bool = True

    def validate(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"num_groups={self.num_groups} must be >= 1")
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
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        config.validate()
        self.config = config
        self.blocks = blocks
        """The KV memory: the scheduler is its only caller (allocate, append, free)."""
        self.waiting: list[deque[Sequence]] = [deque() for _ in range(NUM_LANES)]
        self.running: list[list[Sequence]] = [[] for _ in range(config.num_groups)]
        self.in_flight: set[int] = set()
        self._per_group = -(-config.max_num_seqs // config.num_groups)
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
    def seqs_per_group(self) -> int:
        return self._per_group

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
        """Remove a sequence for good and free its blocks (it must not be in flight)."""
        assert status.is_finished, status
        if self._by_id.pop(seq.request_id, None) is None:
            return
        if seq.group is not None:
            self.running[seq.group].remove(seq)
            self._release(seq)
        else:
            self.waiting[seq.priority].remove(seq)
        seq.status = status

    def is_in_flight(self, seq: Sequence) -> bool:
        return seq.group is not None and seq.group in self.in_flight

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
            if seq.status is not SeqStatus.RUNNING or not self._reserve_pending(seq, plan):
                continue  # preempted (now or for lack of blocks)
            budget -= self._plan_item(plan, seq, budget)
        budget = self.config.max_num_batched_tokens - plan.num_tokens
        while budget > 0 and (cap is None or len(plan.items) < cap):
            seq = self._peek_waiting(now)
            if seq is None:
                break
            if not self._has_room(seq, group) and not self._preempt_for(seq, plan, now):
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

    def complete(self, plan: StepPlan, ok: bool = True) -> None:
        """The step ran: its tokens are in the cache (their full blocks join the prefix cache).
        Sampled tokens are appended by the caller. `ok=False`: the step failed and its sequences
        are about to be finished; nothing it wrote is published."""
        self.in_flight.discard(plan.group)
        for item in plan.items:
            item.seq.num_computed = item.start + item.num_tokens
            if ok and self.blocks.has(item.seq.request_id):
                self.blocks.mark_computed(item.seq.request_id, item.seq.num_computed)

    # ---------------------------------------------------------------- internals

    def _plan_item(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        num = min(seq.num_uncomputed, budget)
        if num <= 0:
            return 0
        plan.items.append(
            ScheduledItem(seq, seq.num_computed, num, sample=num == seq.num_uncomputed)
        )
        return num

    def _has_room(self, seq: Sequence, group: int) -> bool:
        return (
            self.num_running < self.config.max_num_seqs
            and len(self.running[group]) < self._per_group
            and self.blocks.can_allocate(all_token_ids(seq))
        )

    def _reserve_pending(self, seq: Sequence, plan: StepPlan) -> bool:
        """Give the token sampled last step its KV slot, preempting for blocks if needed.

        False when `seq` itself was preempted (it was the lowest, most recent candidate)."""
        rid = seq.request_id
        missing = seq.num_tokens - self.blocks.num_tokens(rid)
        if missing <= 0:
            return True
        while not self.blocks.can_append(rid, missing):
            candidates = [
                s
                for group, running in enumerate(self.running)
                if group not in self.in_flight
                for s in running
            ]
            victim = max(candidates, key=lambda s: (s.priority, s.started_at or 0.0, s.arrival))
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.may_append(rid, seq.output_ids[len(seq.output_ids) - missing :])
        return True

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
        # Prefill starts after the cached prefix (prompt and, on resume, earlier outputs).
        seq.num_computed = self.blocks.allocate(
            seq.request_id, all_token_ids(seq), resumed=seq.num_preemptions > 0
        )
        seq.group = group
        seq.status = SeqStatus.RUNNING
        if seq.started_at is None:
            seq.started_at = now
        self.running[group].append(seq)

    def _release(self, seq: Sequence) -> None:
        assert seq.group is not None
        self.blocks.deallocate(seq.request_id)
        seq.group = None

    def _preempt(self, victim: Sequence, plan: StepPlan) -> None:
        """Recompute preemption: blocks freed, back to the front of its lane."""
        for item in [i for i in plan.items if i.seq is victim]:
            plan.items.remove(item)
        assert victim.group is not None
        self.running[victim.group].remove(victim)
        self._release(victim)
        victim.status = SeqStatus.PREEMPTED
        victim.num_computed = 0
        victim.num_preemptions += 1
        # Front of its lane: it was admitted before everything still waiting there.
        self.waiting[victim.priority].appendleft(victim)
        plan.preempted.append(victim)

    def _preempt_for(self, waiter: Sequence, plan: StepPlan, now: float) -> bool:
        """Make room in plan.group for `waiter` by preempting lower-lane sequences."""
        if not self.config.preemption:
            return False
        lane = self._effective_lane(waiter, now)
        while True:
            candidates = [
                s
                for s in self.running[plan.group]
                if s.priority > waiter.priority and self._effective_lane(s, now) > lane
            ]
            if not candidates:
                return False
            victim = max(candidates, key=lambda s: (s.priority, s.started_at or 0.0, s.arrival))
            self._preempt(victim, plan)
            if self._has_room(waiter, plan.group):
                return True


def all_token_ids(seq: Sequence) -> list[int]:
    return seq.prompt_ids + seq.output_ids
