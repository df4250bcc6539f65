"""Unit tests of the pure scheduler (streamer.engine.scheduler).

The scheduler is synchronous and takes time as an argument, so these tests drive it with a tiny
pure simulation of the engine (and a real, pure BlockManager): schedule -> complete -> append one token per sampled item -> finish
sequences that reached max_tokens. Every plan is checked against the scheduler's invariants.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.scheduler import NUM_LANES, Scheduler, SchedulerConfig, StepPlan
from streamer.engine.sequence import SamplingParams, SeqStatus, Sequence

URGENT, HIGH, NORMAL, LOW = range(NUM_LANES)


# ------------------------------------------------------------------------------------ factories


def make_seq(
    request_id: str,
    prompt_len: int,
    priority: int = NORMAL,
    arrival: float = 0.0,
    max_tokens: int = 16,
) -> Sequence:
    return Sequence(
        request_id,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens),
        priority=priority,
        arrival=arrival,
    )


SEQ_BLOCK = 64
"""Block size of `num_slots` schedulers: every sequence of these tests fits one block."""


def make_scheduler(
    num_slots: int = 32,
    block_size: int | None = None,
    num_blocks: int | None = None,
    prefix_caching: bool = False,
    **config: object,
) -> Scheduler:
    """A scheduler over `num_slots` one-sequence blocks (the old slot tests), or over
    `num_blocks` blocks of `block_size` tokens."""
    blocks = BlockManager(
        num_blocks or num_slots, block_size or SEQ_BLOCK, prefix_caching=prefix_caching
    )
    return Scheduler(SchedulerConfig(**config), blocks)  # type: ignore[arg-type]


def admit_order(scheduler: Scheduler, now: float) -> list[str]:
    """Request ids of the sequences admitted by one schedule call, in plan order."""
    plan = scheduler.schedule(0, now)
    assert plan is not None
    return [item.seq.request_id for item in plan.items]


def run_step(scheduler: Scheduler, now: float) -> StepPlan:
    """Schedule group 0, complete the step and append a token to every sampled sequence."""
    plan = scheduler.schedule(0, now)
    assert plan is not None
    scheduler.complete(plan)
    for item in plan.items:
        if item.sample:
            item.seq.output_ids.append(42)
    return plan


# ------------------------------------------------------------------------------------ invariants


def check_state(scheduler: Scheduler) -> None:
    """Invariants of the scheduler's state between calls."""
    cfg = scheduler.config
    blocks = scheduler.blocks
    assert scheduler.num_running <= cfg.max_num_seqs
    used: set[int] = set()
    for group, running in enumerate(scheduler.running):
        assert len(running) <= scheduler.seqs_per_group
        for seq in running:
            assert seq.status is SeqStatus.RUNNING
            assert seq.group == group
            table = blocks.block_table(seq.request_id)
            # Slots for every token it has, the last sampled one at most still pending.
            assert blocks.num_tokens(seq.request_id) in (seq.num_tokens, seq.num_tokens - 1)
            assert len(table) == blocks.blocks_for(blocks.num_tokens(seq.request_id))
            if not blocks.prefix_caching:
                assert not used & set(table), "a block allocated twice"
            used |= set(table)
            assert 0 <= seq.num_computed <= seq.num_tokens
    if not blocks.prefix_caching:
        assert blocks.stats.used_blocks == len(used)
    blocks.check_invariants()
    for lane, waiting in enumerate(scheduler.waiting):
        for seq in waiting:
            assert seq.priority == lane
            assert not blocks.has(seq.request_id) and seq.group is None
            assert seq.status in (SeqStatus.WAITING, SeqStatus.PREEMPTED)
    ids = [s.request_id for s in scheduler.sequences()]
    assert len(ids) == scheduler.num_running + scheduler.num_waiting


def check_plan(scheduler: Scheduler, plan: StepPlan, in_flight: list[StepPlan]) -> None:
    """Invariants of a freshly scheduled plan (before `complete`)."""
    cfg = scheduler.config
    assert plan.num_tokens <= cfg.max_num_batched_tokens
    assert 0 <= plan.group < cfg.num_groups
    seen: set[str] = set()
    for item in plan.items:
        seq = item.seq
        assert seq.request_id not in seen, "a sequence twice in one plan"
        seen.add(seq.request_id)
        assert seq in scheduler.running[plan.group]
        assert seq.group == plan.group
        assert item.num_tokens >= 1
        assert item.start == seq.num_computed
        end = item.start + item.num_tokens
        assert end <= seq.num_tokens
        assert item.sample == (end == seq.num_tokens)
        assert scheduler.is_in_flight(seq)
    for seq in plan.preempted:
        assert seq.status is SeqStatus.PREEMPTED
        assert not scheduler.blocks.has(seq.request_id) and seq.num_computed == 0
        assert seq in scheduler.waiting[seq.priority]
        assert seq.request_id not in seen
    if plan.items:
        assert plan.group in scheduler.in_flight
    # A group in flight is never planned again, so no sequence is in two in-flight plans.
    for other in in_flight:
        assert other.group != plan.group
        assert not seen & {item.seq.request_id for item in other.items}
    check_state(scheduler)


# ------------------------------------------------------------------------------------ the driver


@dataclass
class Sim:
    """A pure stand-in for the engine loop, with up to `num_groups` plans in flight."""

    scheduler: Scheduler
    dt: float = 1.0
    now: float = 0.0
    arrivals: deque[tuple[float, Sequence]] = field(default_factory=deque)
    in_flight: deque[StepPlan] = field(default_factory=deque)
    finished: dict[str, Sequence] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    scheduled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Tokens scheduled per request, all steps together."""
    recomputed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Tokens thrown away by preemptions (they are scheduled again on resume)."""
    preemptions: list[str] = field(default_factory=list)
    computed: dict[str, int] = field(default_factory=dict)
    """The driver's own record of each sequence's tokens in the cache."""
    steps: int = 0
    prev_group: dict[str, int] = field(default_factory=dict)

    def submit(self, seq: Sequence, at: float | None = None) -> Sequence:
        """Add `seq` to the scheduler once the clock reaches `at` (default: now)."""
        at = self.now if at is None else at
        seq.arrival = at
        self.arrivals.append((at, seq))
        self.arrivals = deque(sorted(self.arrivals, key=lambda pair: pair[0]))
        return seq

    def _arrive(self) -> None:
        while self.arrivals and self.arrivals[0][0] <= self.now:
            _, seq = self.arrivals.popleft()
            self.scheduler.add(seq)

    def step(self) -> None:
        """Fill the pipeline, complete the oldest plan, advance the clock."""
        sched = self.scheduler
        self._arrive()
        while len(self.in_flight) < sched.config.num_groups:
            plan = sched.schedule_next(self.now)
            if plan is None:
                break
            check_plan(sched, plan, list(self.in_flight))
            for victim in plan.preempted:
                self.preemptions.append(victim.request_id)
                self.recomputed[victim.request_id] += self.computed.pop(victim.request_id, 0)
                self.prev_group.pop(victim.request_id, None)
            for item in plan.items:
                rid = item.seq.request_id
                # A running sequence never changes group (only a preemption lets it move).
                assert self.prev_group.setdefault(rid, plan.group) == plan.group
            if plan.items:
                self.in_flight.append(plan)
        if self.in_flight:
            self._complete(self.in_flight.popleft())
        self.steps += 1
        self.now += self.dt

    def _complete(self, plan: StepPlan) -> None:
        sched = self.scheduler
        sched.complete(plan)
        assert plan.group not in sched.in_flight
        for item in plan.items:
            seq = item.seq
            self.scheduled[seq.request_id] += item.num_tokens
            self.computed[seq.request_id] = item.start + item.num_tokens
            assert seq.num_computed == item.start + item.num_tokens
            if not item.sample:
                continue
            assert seq.num_uncomputed == 0
            seq.output_ids.append(1000 + len(seq.output_ids))
            if len(seq.output_ids) >= seq.params.max_tokens:
                sched.finish(seq, SeqStatus.FINISHED_LENGTH)
                assert seq.status is SeqStatus.FINISHED_LENGTH
                assert not sched.blocks.has(seq.request_id) and seq.request_id not in sched
                self.finished[seq.request_id] = seq
                self.finished_at[seq.request_id] = self.now
        check_state(sched)

    @property
    def idle(self) -> bool:
        return not self.arrivals and not self.in_flight and not self.scheduler.has_work

    def run(self, max_steps: int = 10_000) -> None:
        """Drive to completion; fail if that takes more than `max_steps` steps."""
        while not self.idle:
            assert self.steps < max_steps, (
                f"not finished after {max_steps} steps: {self.scheduler.num_running} running, "
                f"{self.scheduler.num_waiting} waiting"
            )
            self.step()


def assert_each_token_computed_once(sim: Sim) -> None:
    for rid, seq in sim.finished.items():
        generated = len(seq.output_ids)
        assert generated == seq.params.max_tokens
        expected = len(seq.prompt_ids) + generated - 1 + sim.recomputed[rid]
        assert sim.scheduled[rid] == expected, rid


# ------------------------------------------------------------------------------------ config


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        make_scheduler(num_groups=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_scheduler(max_num_seqs=0)
    with pytest.raises(ValueError, match="aging_s"):
        make_scheduler(aging_s=-1)


def test_add_rejects_duplicates_and_bad_lanes() -> None:
    sched = make_scheduler()
    sched.add(make_seq("a", 4))
    assert "a" in sched and sched.get("a") is not None
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make_seq("a", 4))
    with pytest.raises(ValueError, match="lane"):
        sched.add(make_seq("b", 4, priority=NUM_LANES))
    with pytest.raises(ValueError, match="lane"):
        sched.add(make_seq("c", 4, priority=-1))
    assert sched.num_waiting == 1 and sched.num_waiting_in(NORMAL) == 1


def test_nothing_to_do_gives_no_plan() -> None:
    sched = make_scheduler()
    assert sched.schedule_next(0.0) is None
    assert not sched.has_work


# ------------------------------------------------------------------------------------ budgets


def test_budgets_hold_with_many_sequences() -> None:
    sched = make_scheduler(max_num_seqs=5, max_num_batched_tokens=16, num_slots=8)
    sim = Sim(sched)
    for i in range(30):
        sim.submit(make_seq(f"r{i}", prompt_len=1 + (7 * i) % 23, max_tokens=1 + i % 5), at=i / 3)
    sim.run()
    assert len(sim.finished) == 30
    assert_each_token_computed_once(sim)


def test_max_num_seqs_below_slots_caps_running() -> None:
    sched = make_scheduler(max_num_seqs=2, num_slots=8)
    for i in range(5):
        sched.add(make_seq(f"r{i}", 3))
    plan = sched.schedule(0, 0.0)
    assert plan is not None
    assert [i.seq.request_id for i in plan.items] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3


def test_finished_sequence_frees_its_blocks_for_the_next_one() -> None:
    sched = make_scheduler(num_slots=3, max_num_seqs=3)
    seqs = [make_seq(f"r{i}", 2, max_tokens=1) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    plan = sched.schedule(0, 0.0)
    assert plan is not None
    tables = [sched.blocks.block_table(s.request_id) for s in seqs]
    assert sorted(t for (t,) in tables) == [0, 1, 2]
    sched.complete(plan)
    sched.finish(seqs[1], SeqStatus.FINISHED_LENGTH)
    assert not sched.blocks.has("r1") and sched.blocks.stats.used_blocks == 2
    late = make_seq("late", 2)
    sched.add(late)
    sched.schedule(0, 1.0)
    assert sched.blocks.block_table("late") == tables[1]


# ------------------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_and_samples_only_at_the_end() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("long", prompt_len=20, max_tokens=3)
    sched.add(seq)
    shapes = []
    for step in range(10):
        plan = sched.schedule_next(float(step))
        if plan is None:
            break
        assert plan.num_tokens <= 8
        (item,) = plan.items
        shapes.append((item.start, item.num_tokens, item.sample))
        sched.complete(plan)
        if item.sample:
            seq.output_ids.append(7)
            if len(seq.output_ids) == seq.params.max_tokens:
                sched.finish(seq, SeqStatus.FINISHED_LENGTH)
    assert shapes == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True), (21, 1, True)]
    assert sum(n for _, n, _ in shapes) == 20 + 3 - 1
    assert not sched.has_work


def test_prefill_chunk_shares_the_budget_with_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq("a", prompt_len=3, arrival=0.0, max_tokens=10)
    sched.add(a)
    plan = sched.schedule(0, 0.0)
    assert plan is not None
    sched.complete(plan)
    a.output_ids.append(5)
    b = make_seq("b", prompt_len=20, arrival=1.0)
    sched.add(b)
    plan = sched.schedule(0, 1.0)
    assert plan is not None
    # `a` decodes one token; `b` gets the rest of the budget as its first chunk.
    assert [(i.seq.request_id, i.start, i.num_tokens, i.sample) for i in plan.items] == [
        ("a", 3, 1, True),
        ("b", 0, 5, False),
    ]


def test_every_token_is_computed_exactly_once() -> None:
    sched = make_scheduler(max_num_batched_tokens=7, max_num_seqs=3, num_slots=3)
    sim = Sim(sched)
    for i in range(12):
        sim.submit(make_seq(f"r{i}", prompt_len=5 + 3 * i, max_tokens=2 + i % 4), at=float(i))
    sim.run()
    assert len(sim.finished) == 12
    assert not sim.preemptions
    assert_each_token_computed_once(sim)


def test_budget_of_one_token_still_finishes_everything() -> None:
    sched = make_scheduler(max_num_batched_tokens=1, max_num_seqs=3, num_slots=3)
    sim = Sim(sched)
    for i in range(4):
        sim.submit(make_seq(f"r{i}", prompt_len=3, max_tokens=2))
    sim.run(max_steps=200)
    assert len(sim.finished) == 4
    assert_each_token_computed_once(sim)


# ------------------------------------------------------------------------------------ finishing


def test_finished_sequence_frees_its_slot_for_the_next_schedule() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1)
    a = make_seq("a", prompt_len=2, max_tokens=1)
    b = make_seq("b", prompt_len=2, max_tokens=1)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule_next(0.0)
    assert plan is not None and [i.seq for i in plan.items] == [a]
    sched.complete(plan)
    a.output_ids.append(9)
    sched.finish(a, SeqStatus.FINISHED_LENGTH)
    assert sched.blocks.stats.used_blocks == 0 and sched.num_running == 0
    plan = sched.schedule_next(1.0)
    assert plan is not None and [i.seq for i in plan.items] == [b]
    assert sched.blocks.has("b")


def test_finish_of_a_waiting_sequence_removes_it_from_its_lane() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1)
    a, b, c = make_seq("a", 2), make_seq("b", 2, priority=LOW), make_seq("c", 2, priority=LOW)
    for seq in (a, b, c):
        sched.add(seq)
    sched.finish(b, SeqStatus.FINISHED_ABORTED)
    assert b.status is SeqStatus.FINISHED_ABORTED
    assert "b" not in sched and list(sched.waiting[LOW]) == [c]
    # Finishing again (or finishing an unknown sequence) is a no-op.
    sched.finish(b, SeqStatus.FINISHED_ABORTED)
    sched.finish(make_seq("zz", 2), SeqStatus.FINISHED_ABORTED)
    assert sched.num_waiting == 2


def test_is_in_flight_follows_schedule_and_complete() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1)
    a, b = make_seq("a", 2), make_seq("b", 2)
    sched.add(a)
    sched.add(b)
    assert not sched.is_in_flight(a)
    plan = sched.schedule_next(0.0)
    assert plan is not None
    assert sched.is_in_flight(a) and not sched.is_in_flight(b)
    with pytest.raises(AssertionError):
        sched.schedule(0, 0.0)
    assert sched.schedule_next(0.0) is None  # its only group is in flight
    sched.complete(plan)
    assert not sched.is_in_flight(a)
    with pytest.raises(AssertionError):
        sched.finish(a, SeqStatus.RUNNING)


# ------------------------------------------------------------------------------------ ordering


def test_strict_priority_across_lanes() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=0)
    sched.add(make_seq("low", 2, priority=LOW, arrival=0.0))
    sched.add(make_seq("normal", 2, priority=NORMAL, arrival=1.0))
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=2.0))
    assert admit_order(sched, 3.0) == ["urgent"]


def test_fifo_within_a_lane() -> None:
    sched = make_scheduler(max_num_seqs=2, num_slots=2)
    for name, arrival in (("first", 0.0), ("second", 1.0), ("third", 2.0)):
        sched.add(make_seq(name, 2, priority=HIGH, arrival=arrival))
    assert admit_order(sched, 3.0) == ["first", "second"]


def test_running_order_is_priority_then_arrival() -> None:
    sched = make_scheduler(max_num_seqs=3, num_slots=3, max_num_batched_tokens=2)
    sched.add(make_seq("low", 1, priority=LOW, arrival=0.0, max_tokens=50))
    run_step(sched, 0.0)
    sched.add(make_seq("urgent", 1, priority=URGENT, arrival=1.0, max_tokens=50))
    sched.add(make_seq("normal", 1, priority=NORMAL, arrival=1.0, max_tokens=50))
    plan = run_step(sched, 1.0)
    assert [i.seq.request_id for i in plan.items] == ["low", "urgent"]
    # Running sequences run in priority order: the later, urgent one goes before low.
    plan = run_step(sched, 2.0)
    assert [i.seq.request_id for i in plan.items] == ["urgent", "low"]
    assert sched.num_waiting_in(NORMAL) == 1


def _aging_scheduler(aging_s: float) -> Scheduler:
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=aging_s)
    sched.add(make_seq("low", 2, priority=LOW, arrival=0.0))
    sched.add(make_seq("high", 2, priority=HIGH, arrival=15.0))
    return sched


@pytest.mark.parametrize(
    ("now", "first"),
    [
        (15.0, "high"),  # low waited 15 s: lane 2; high waited 0 s: lane 1
        (19.9, "high"),
        (20.0, "low"),  # low waited 20 s: lane 1, and arrived before high (lane 1): FIFO
        (25.0, "high"),  # high waited 10 s: lane 0; low is still lane 1
        (30.0, "low"),  # both lane 0; low arrived first
        (1000.0, "low"),
    ],
)
def test_aging_lifts_a_waiting_request_one_lane_per_aging_s(now: float, first: str) -> None:
    assert admit_order(_aging_scheduler(10.0), now) == [first]


def test_aged_request_is_fifo_with_its_new_lane() -> None:
    # After aging_s the low request counts as normal; it arrived first, so it goes first.
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=10.0)
    sched.add(make_seq("low", 2, priority=LOW, arrival=0.0))
    sched.add(make_seq("normal", 2, priority=NORMAL, arrival=5.0))
    assert admit_order(sched, 9.9) == ["normal"]
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=10.0)
    sched.add(make_seq("low", 2, priority=LOW, arrival=0.0))
    sched.add(make_seq("normal", 2, priority=NORMAL, arrival=5.0))
    assert admit_order(sched, 10.0) == ["low"]


def test_aging_zero_disables_aging() -> None:
    assert admit_order(_aging_scheduler(0.0), 1e9) == ["high"]


# ------------------------------------------------------------------------------------ preemption


def _full_of_low(num_slots: int = 2, **config: object) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler whose slots are all taken by low sequences started at t=0, 1, ..."""
    sched = make_scheduler(max_num_seqs=num_slots, num_slots=num_slots, **config)
    lows = []
    for i in range(num_slots):
        seq = make_seq(f"low{i}", 3, priority=LOW, arrival=float(i), max_tokens=50)
        sched.add(seq)
        run_step(sched, float(i))
        lows.append(seq)
    return sched, lows


def test_urgent_arrival_preempts_the_most_recently_started_low() -> None:
    sched, (low0, low1) = _full_of_low()
    waiting_low = make_seq("waiting-low", 2, priority=LOW, arrival=1.5)
    sched.add(waiting_low)
    urgent = make_seq("urgent", 4, priority=URGENT, arrival=5.0)
    sched.add(urgent)
    table = sched.blocks.block_table("low1")
    plan = sched.schedule(0, 5.0)
    assert plan is not None
    assert plan.preempted == [low1]
    assert low1.status is SeqStatus.PREEMPTED
    assert low1.num_computed == 0 and not sched.blocks.has("low1") and low1.num_preemptions == 1
    assert low1.output_ids == [42]
    assert list(sched.waiting[LOW]) == [low1, waiting_low]  # front of its lane
    assert sched.blocks.block_table("urgent") == table  # it took the freed block
    # The victim's decode was planned before the urgent request arrived; it is dropped.
    assert [i.seq for i in plan.items] == [low0, urgent]
    assert plan.num_tokens == 1 + 4
    check_state(sched)

    # Resuming recomputes prompt + outputs in one go and samples the next token.
    sched.complete(plan)
    sched.finish(urgent, SeqStatus.FINISHED_ABORTED)
    plan = sched.schedule(0, 6.0)
    assert plan is not None
    resumed = next(i for i in plan.items if i.seq is low1)
    assert low1.num_tokens == 4 and low1.num_uncomputed == low1.num_tokens
    assert (resumed.start, resumed.num_tokens, resumed.sample) == (0, 4, True)
    assert low1.status is SeqStatus.RUNNING
    assert low1.started_at == 1.0  # the first start is kept


def test_preemption_picks_the_lowest_lane_first() -> None:
    sched = make_scheduler(max_num_seqs=2, num_slots=2)
    low = make_seq("low", 2, priority=LOW, arrival=0.0)
    normal = make_seq("normal", 2, priority=NORMAL, arrival=1.0)
    sched.add(low)
    run_step(sched, 0.0)
    sched.add(normal)
    run_step(sched, 1.0)
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=2.0))
    plan = sched.schedule(0, 2.0)
    assert plan is not None and plan.preempted == [low]


def test_same_priority_arrival_never_preempts() -> None:
    sched, lows = _full_of_low()
    sched.add(make_seq("another-low", 2, priority=LOW, arrival=5.0))
    plan = sched.schedule(0, 5.0)
    assert plan is not None and not plan.preempted
    assert all(seq.status is SeqStatus.RUNNING for seq in lows)
    assert sched.num_waiting_in(LOW) == 1


def test_higher_lane_does_not_preempt_equal_or_higher_lanes() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1)
    sched.add(make_seq("urgent", 2, priority=URGENT))
    run_step(sched, 0.0)
    sched.add(make_seq("urgent2", 2, priority=URGENT, arrival=1.0))
    sched.add(make_seq("high", 2, priority=HIGH, arrival=1.0))
    plan = sched.schedule(0, 1.0)
    assert plan is not None and not plan.preempted


def test_preemption_false_disables_preemption() -> None:
    sched, _ = _full_of_low(preemption=False)
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=5.0))
    plan = sched.schedule(0, 5.0)
    assert plan is not None and not plan.preempted
    assert sched.num_waiting_in(URGENT) == 1


def test_aging_never_preempts() -> None:
    # A low request aged up to lane 0 still cannot preempt a running normal one.
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=1.0)
    sched.add(make_seq("normal", 2, priority=NORMAL, arrival=0.0, max_tokens=50))
    run_step(sched, 0.0)
    sched.add(make_seq("low", 2, priority=LOW, arrival=0.0))
    plan = sched.schedule(0, 100.0)
    assert plan is not None and not plan.preempted


def test_aged_sequence_is_not_preempted_by_a_waiter_it_queued_ahead_of() -> None:
    # Aging admits low before high; high must not then preempt it (it would queue ahead again).
    sched = _aging_scheduler(10.0)
    plan = sched.schedule(0, 20.0)
    assert plan is not None and not plan.preempted
    assert [i.seq.request_id for i in plan.items] == ["low"]
    assert sched.num_waiting_in(HIGH) == 1


def test_urgent_still_preempts_a_low_sequence_in_a_lower_aged_lane() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1, aging_s=10.0)
    low = make_seq("low", 2, priority=LOW, arrival=0.0, max_tokens=50)
    sched.add(low)
    run_step(sched, 0.0)
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=15.0))
    plan = sched.schedule(0, 15.0)  # low counts as lane 2 by now: still below urgent
    assert plan is not None and plan.preempted == [low]


def test_finish_of_a_preempted_sequence_removes_it_from_its_lane() -> None:
    sched, (_, low1) = _full_of_low()
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=5.0))
    plan = sched.schedule(0, 5.0)
    assert plan is not None and plan.preempted == [low1]
    assert not sched.is_in_flight(low1)
    sched.finish(low1, SeqStatus.FINISHED_ABORTED)
    assert "low1" not in sched and sched.num_waiting_in(LOW) == 0
    check_state(sched)


def test_preempted_sequence_finishes_with_all_its_tokens() -> None:
    sched = make_scheduler(max_num_seqs=1, num_slots=1, max_num_batched_tokens=4, aging_s=0)
    sim = Sim(sched)
    sim.submit(make_seq("low", prompt_len=6, priority=LOW, max_tokens=5), at=0.0)
    sim.submit(make_seq("urgent", prompt_len=3, priority=URGENT, max_tokens=2), at=4.0)
    sim.run(max_steps=100)
    assert sim.preemptions == ["low"]
    assert set(sim.finished) == {"low", "urgent"}
    assert sim.finished_at["urgent"] < sim.finished_at["low"]
    assert sim.recomputed["low"] > 0
    assert_each_token_computed_once(sim)


# ------------------------------------------------------------------------------------ groups


def test_schedule_next_alternates_groups_and_skips_groups_in_flight() -> None:
    sched = make_scheduler(num_groups=2, num_slots=4, max_num_seqs=4)
    seqs = [make_seq(f"r{i}", 2, max_tokens=10) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    p0 = sched.schedule_next(0.0)
    p1 = sched.schedule_next(0.0)
    assert p0 is not None and p1 is not None
    assert (p0.group, p1.group) == (0, 1)
    assert sched.in_flight == {0, 1}
    assert sched.schedule_next(0.0) is None
    assert [s.group for s in seqs] == [0, 0, 1, 1]  # ceil(max_num_seqs / groups) per group
    groups = {s.request_id: s.group for s in seqs}

    sched.complete(p0)
    for item in p0.items:
        item.seq.output_ids.append(1)
    p2 = sched.schedule_next(1.0)
    assert p2 is not None and p2.group == 0
    assert sched.schedule_next(1.0) is None  # both in flight again
    sched.complete(p1)
    for item in p1.items:
        item.seq.output_ids.append(1)
    p3 = sched.schedule_next(2.0)
    assert p3 is not None and p3.group == 1
    assert {s.request_id: s.group for s in seqs} == groups


def test_groups_share_max_num_seqs() -> None:
    sched = make_scheduler(num_groups=2, num_slots=8, max_num_seqs=3)
    sim = Sim(sched)
    for i in range(10):
        sim.submit(make_seq(f"r{i}", prompt_len=4, max_tokens=3), at=0.0)
    sim.run(max_steps=500)
    assert len(sim.finished) == 10
    assert_each_token_computed_once(sim)


def test_preemption_stays_within_the_group() -> None:
    sched = make_scheduler(num_groups=2, num_slots=2, max_num_seqs=2)
    low0 = make_seq("low0", 2, priority=LOW, max_tokens=50)
    low1 = make_seq("low1", 2, priority=LOW, max_tokens=50)
    sched.add(low0)
    sched.add(low1)
    p0 = sched.schedule_next(0.0)  # group 0: low0
    p1 = sched.schedule_next(0.0)  # group 1: low1
    assert p0 is not None and p1 is not None
    assert (low0.group, low1.group) == (0, 1)
    sched.complete(p0)
    low0.output_ids.append(1)
    sched.add(make_seq("urgent", 2, priority=URGENT, arrival=1.0))
    # Group 1 is in flight: only group 0's sequence can make room.
    plan = sched.schedule_next(1.0)
    assert plan is not None and plan.group == 0
    assert plan.preempted == [low0]
    assert low1.status is SeqStatus.RUNNING and sched.is_in_flight(low1)


# ------------------------------------------------------------------------------------ starvation


def test_steady_stream_every_sequence_finishes() -> None:
    sched = make_scheduler(max_num_seqs=4, num_slots=4, max_num_batched_tokens=16, aging_s=5.0)
    sim = Sim(sched)
    for i in range(120):
        sim.submit(
            make_seq(
                f"r{i}",
                prompt_len=2 + (5 * i) % 11,
                priority=(3 * i) % NUM_LANES,
                max_tokens=1 + (7 * i) % 6,
            ),
            at=i * 0.8,
        )
    sim.run(max_steps=2_000)
    assert len(sim.finished) == 120
    assert_each_token_computed_once(sim)


def _urgent_overload(aging_s: float, steps: int) -> Sim:
    """One slot; an urgent request every step, each needing several steps: urgent never drains."""
    sched = make_scheduler(max_num_seqs=1, num_slots=1, max_num_batched_tokens=8, aging_s=aging_s)
    sim = Sim(sched)
    for i in range(steps):
        sim.submit(make_seq(f"u{i}", prompt_len=2, priority=URGENT, max_tokens=3), at=float(i))
    sim.submit(make_seq("low", prompt_len=5, priority=LOW, max_tokens=3), at=0.5)
    for _ in range(steps):
        sim.step()
    return sim


def test_aging_prevents_starvation_under_urgent_overload() -> None:
    sim = _urgent_overload(aging_s=5.0, steps=80)
    assert "low" in sim.finished
    assert sim.scheduler.num_waiting_in(URGENT) > 0  # the overload lasted throughout
    sim.run(max_steps=2_000)
    assert_each_token_computed_once(sim)


def test_without_aging_urgent_overload_starves_low() -> None:
    sim = _urgent_overload(aging_s=0.0, steps=80)
    assert "low" not in sim.finished
    sim.run(max_steps=2_000)  # it still finishes once the overload stops
    assert "low" in sim.finished


# ------------------------------------------------------------------------------------ property


configs = st.builds(
    lambda groups, extra_slots, seqs, budget, aging, preempt: dict(
        num_groups=groups,
        num_slots=groups * (1 + extra_slots),
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        aging_s=aging,
        preemption=preempt,
    ),
    groups=st.integers(1, 3),
    extra_slots=st.integers(0, 3),
    seqs=st.integers(1, 8),
    budget=st.integers(1, 40),
    aging=st.sampled_from([0.0, 0.5, 3.0, 30.0]),
    preempt=st.booleans(),
)

workloads = st.lists(
    st.tuples(
        st.integers(0, 30),  # arrival step
        st.integers(0, NUM_LANES - 1),  # priority
        st.integers(1, 40),  # prompt length
        st.integers(1, 8),  # max_tokens
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, workload=workloads)
def test_random_workloads_keep_invariants_and_finish(
    config: dict[str, object], workload: list[tuple[int, int, int, int]]
) -> None:
    sim = Sim(make_scheduler(**config))
    for n, (at, priority, prompt_len, max_tokens) in enumerate(workload):
        sim.submit(make_seq(f"r{n}", prompt_len, priority, max_tokens=max_tokens), at=float(at))
    total = sum(p + m for _, _, p, m in workload)
    sim.run(max_steps=200 + 40 * total)
    assert len(sim.finished) == len(workload)
    assert_each_token_computed_once(sim)
    assert sim.scheduler.blocks.stats.used_blocks == 0 and not sim.scheduler.in_flight
    if not config["preemption"]:
        assert not sim.preemptions


def test_out_of_memory_cap_limits_sequences_and_abandon_replans_the_same_work() -> None:
    scheduler = make_scheduler(max_num_seqs=8, num_slots=8, max_num_batched_tokens=512)
    for i in range(6):
        scheduler.add(make_seq(f"s{i}", prompt_len=5))
    plan = scheduler.schedule(0, 0.0)
    assert plan is not None and len(plan.items) == 6
    scheduler.abandon(plan)  # the step failed without effect
    assert all(item.seq.num_computed == 0 for item in plan.items)
    scheduler.step_cap = 2
    capped = scheduler.schedule(0, 0.0)
    assert capped is not None and len(capped.items) == 2
    assert [(i.start, i.num_tokens) for i in capped.items] == [(0, 5), (0, 5)]
    scheduler.complete(capped)
    for item in capped.items:
        item.seq.output_ids.append(7)  # what the engine does with a sampled token
    scheduler.step_cap = None
    full = scheduler.schedule(0, 0.0)
    assert full is not None and len(full.items) == 6  # the cap lifted: everyone runs again


# ------------------------------------------------------------------------------------ KV blocks


def test_kv_blocks_grow_with_the_sequence() -> None:
    sched = make_scheduler(block_size=4, num_blocks=8)
    seq = make_seq("a", prompt_len=5, max_tokens=8)
    sched.add(seq)
    used = []
    for step in range(8):
        plan = run_step(sched, float(step))
        assert plan.items
        used.append(len(sched.blocks.block_table("a")))
    # 5 prompt tokens: 2 blocks; a block more once token 9 and 13 need slots.
    assert used == [2, 2, 2, 2, 3, 3, 3, 3]
    assert sched.blocks.num_tokens("a") == seq.num_tokens - 1  # the last sample: no slot yet


def test_out_of_blocks_preempts_the_most_recent_and_everything_finishes() -> None:
    # Two sequences of 4 + 8 tokens need 3 blocks each; 4 blocks hold only one of them at the end.
    sched = make_scheduler(block_size=4, num_blocks=4, max_num_seqs=2)
    sim = Sim(sched)
    sim.submit(make_seq("old", prompt_len=4, max_tokens=8), at=0.0)
    sim.submit(make_seq("new", prompt_len=4, max_tokens=8), at=1.0)
    sim.run(max_steps=200)
    assert set(sim.finished) == {"old", "new"}
    assert sim.preemptions and sim.preemptions[0] == "new"  # most recently started goes first
    assert_each_token_computed_once(sim)
    assert sched.blocks.stats.used_blocks == 0


def test_resumed_sequences_are_counted_apart_from_new_prompts() -> None:
    # Two 6-token prompts fill 4 blocks; "new" is preempted when "old" needs a third block. Each
    # prompt is queried once, on first admission; the re-admission of "new" (prompt + 3 outputs)
    # goes to the preempted totals. Its tail block was evicted for "old", so only its first
    # block hits: 9 queried, 4 hit, 5 recomputed.
    sched = make_scheduler(block_size=4, num_blocks=4, max_num_seqs=2, prefix_caching=True)
    old = Sequence("old", list(range(1, 7)), SamplingParams(max_tokens=6), arrival=0.0)
    new = Sequence("new", list(range(101, 107)), SamplingParams(max_tokens=6), arrival=1.0)
    sched.add(old)
    sched.add(new)
    preempted = []
    for step in range(40):
        plan = sched.schedule(0, float(step))
        if plan is None:
            break
        preempted += [s.request_id for s in plan.preempted]
        sched.complete(plan)
        for item in plan.items:
            if item.sample:
                item.seq.output_ids.append(1000 + len(item.seq.output_ids))
                if len(item.seq.output_ids) >= item.seq.params.max_tokens:
                    sched.finish(item.seq, SeqStatus.FINISHED_LENGTH)
    assert not sched.has_work and preempted == ["new"]
    stats = sched.blocks.stats
    assert (stats.query_tokens, stats.hit_tokens) == (12, 0)
    assert (stats.preempted_query_tokens, stats.preempted_hit_tokens) == (9, 4)


def test_decode_preemption_takes_the_lowest_lane_first() -> None:
    sched = make_scheduler(block_size=4, num_blocks=3, max_num_seqs=2, aging_s=0)
    low = make_seq("low", prompt_len=2, priority=LOW, arrival=0.0, max_tokens=20)
    urgent = make_seq("urgent", prompt_len=3, priority=URGENT, arrival=1.0, max_tokens=20)
    sched.add(low)
    run_step(sched, 0.0)
    sched.add(urgent)
    for step in range(1, 10):
        plan = run_step(sched, float(step))
        if plan.preempted:
            assert plan.preempted == [low]
            break
    else:
        raise AssertionError("no preemption")
    assert urgent.status is SeqStatus.RUNNING


def test_prefix_caching_skips_the_shared_prompt_prefix() -> None:
    sched = make_scheduler(block_size=4, num_blocks=16, prefix_caching=True)
    first = make_seq("first", prompt_len=10, max_tokens=2)
    sched.add(first)
    run_step(sched, 0.0)  # computes the 10 prompt tokens: blocks 0-1 are full and cached
    second = Sequence("second", [*first.prompt_ids[:9], 77, 78], SamplingParams(max_tokens=2))
    sched.add(second)
    plan = sched.schedule(0, 1.0)
    assert plan is not None
    item = next(i for i in plan.items if i.seq is second)
    assert (item.start, item.num_tokens) == (8, 3)  # two full shared blocks are not recomputed
    assert sched.blocks.block_table("second")[:2] == sched.blocks.block_table("first")[:2]
    assert sched.blocks.stats.hit_tokens == 8


small_block_configs = st.builds(
    lambda groups, seqs, budget, blocks, preempt: dict(
        num_groups=groups,
        block_size=4,
        num_blocks=blocks,
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        preemption=preempt,
    ),
    groups=st.integers(1, 3),
    seqs=st.integers(1, 8),
    budget=st.integers(1, 40),
    blocks=st.integers(12, 30),  # the longest sequence (40 + 8 tokens) needs 12
    preempt=st.booleans(),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=small_block_configs, workload=workloads)
def test_random_workloads_over_small_blocks_finish(
    config: dict[str, object], workload: list[tuple[int, int, int, int]]
) -> None:
    sim = Sim(make_scheduler(**config))
    for n, (at, priority, prompt_len, max_tokens) in enumerate(workload):
        sim.submit(make_seq(f"r{n}", prompt_len, priority, max_tokens=max_tokens), at=float(at))
    total = sum(p + m for _, _, p, m in workload)
    sim.run(max_steps=400 + 80 * total)
    assert len(sim.finished) == len(workload)
    assert_each_token_computed_once(sim)
    assert sim.scheduler.blocks.stats.used_blocks == 0 and not sim.scheduler.in_flight
