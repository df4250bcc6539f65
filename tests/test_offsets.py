"""Tests for the commit watermark tracker (streamer.commits.offsets)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streamer.commits.offsets import OffsetTracker

T = "requests"


def test_empty_tracker_has_nothing_to_commit() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() == {}
    assert tracker.pending() == 0
    assert not tracker.is_tracked(T, 0, 0)


def test_tracking_alone_is_not_progress() -> None:
    tracker = OffsetTracker()
    tracker.track(T, 0, 10)
    tracker.track(T, 0, 11)
    # Committing 10 would only restate where consumption started.
    assert tracker.committable() == {}
    assert tracker.pending() == 2
    assert tracker.is_tracked(T, 0, 10)


def test_in_order_finishes_advance_the_watermark() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.track(T, 0, offset)
    assert tracker.finish(T, 0, 0)
    assert tracker.committable() == {(T, 0): 1}
    tracker.finish(T, 0, 1)
    tracker.finish(T, 0, 2)
    assert tracker.committable() == {(T, 0): 3}
    assert tracker.pending() == 0


def test_out_of_order_finishes_hold_the_watermark_at_the_lowest_unfinished() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.track(T, 0, offset)
    for offset in (4, 2, 3):
        tracker.finish(T, 0, offset)
    assert tracker.committable() == {}  # 0 is still in flight: nothing below 0 changed
    tracker.finish(T, 0, 0)
    assert tracker.committable() == {(T, 0): 1}  # 1 is still in flight
    tracker.finish(T, 0, 1)
    assert tracker.committable() == {(T, 0): 5}


def test_gaps_in_offsets_are_skipped() -> None:
    # Compacted topics and transaction markers leave holes in the offset sequence.
    tracker = OffsetTracker()
    for offset in (3, 7, 8, 20):
        tracker.track(T, 1, offset)
    tracker.finish(T, 1, 3)
    assert tracker.committable() == {(T, 1): 7}  # the lowest unfinished, not 4
    tracker.finish(T, 1, 8)
    tracker.finish(T, 1, 7)
    assert tracker.committable() == {(T, 1): 20}
    tracker.finish(T, 1, 20)
    assert tracker.committable() == {(T, 1): 21}  # last finished + 1
    tracker.track(T, 1, 30)
    assert tracker.committable() == {(T, 1): 30}  # 21..29 do not exist


def test_mark_committed_only_reports_new_progress() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.track(T, 0, offset)
    tracker.finish(T, 0, 0)
    positions = tracker.committable()
    assert positions == {(T, 0): 1}
    tracker.mark_committed(positions)
    assert tracker.committable() == {}
    tracker.finish(T, 0, 2)  # out of order: still stuck at 1
    assert tracker.committable() == {}
    tracker.finish(T, 0, 1)
    assert tracker.committable() == {(T, 0): 3}


def test_stale_commit_acknowledgement_does_not_rewind() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.track(T, 0, offset)
    tracker.finish(T, 0, 0)
    first = tracker.committable()
    tracker.finish(T, 0, 1)
    tracker.finish(T, 0, 2)
    second = tracker.committable()
    tracker.mark_committed(second)
    tracker.mark_committed(first)  # acknowledged late
    assert tracker.committable() == {}


def test_mark_committed_ignores_unknown_partitions() -> None:
    tracker = OffsetTracker()
    tracker.mark_committed({(T, 9): 100})
    assert tracker.committable() == {}
    tracker.track(T, 9, 5)
    tracker.finish(T, 9, 5)
    assert tracker.committable() == {(T, 9): 6}


def test_partitions_and_topics_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(T, 0, 0)
    tracker.track(T, 1, 100)
    tracker.track("other", 0, 50)
    tracker.finish(T, 1, 100)
    tracker.finish("other", 0, 50)
    assert tracker.committable() == {(T, 1): 101, ("other", 0): 51}
    assert tracker.pending() == 1
    assert tracker.pending(T) == 1
    assert tracker.pending(T, 0) == 1
    assert tracker.pending(T, 1) == 0
    assert tracker.pending("other") == 0
    assert tracker.pending(partition=0) == 1
    assert sorted(tracker.partitions()) == [("other", 0), (T, 0), (T, 1)]


def test_finishing_unknown_offsets_is_ignored() -> None:
    tracker = OffsetTracker()
    assert not tracker.finish(T, 0, 5)  # unknown partition
    tracker.track(T, 0, 5)
    tracker.track(T, 0, 7)
    assert not tracker.finish(T, 0, 6)  # a gap, never tracked
    assert not tracker.finish(T, 0, 99)
    assert tracker.finish(T, 0, 5)
    assert not tracker.finish(T, 0, 5)  # already finished
    assert tracker.committable() == {(T, 0): 7}
    assert tracker.pending() == 1


def test_backwards_jump_resets_the_partition() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.track(T, 0, offset)
    tracker.finish(T, 0, 10)
    tracker.mark_committed(tracker.committable())
    tracker.finish(T, 0, 12)
    # The consumer is repositioned to 5 (seek, rebalance or broker failover).
    tracker.track(T, 0, 5)
    assert tracker.pending(T, 0) == 1
    assert not tracker.is_tracked(T, 0, 11)
    assert tracker.committable() == {}
    assert not tracker.finish(T, 0, 11)  # a late completion from before the reset
    tracker.track(T, 0, 6)
    tracker.finish(T, 0, 5)
    assert tracker.committable() == {(T, 0): 6}  # below the old commit: it is a rewind


def test_repeated_offset_counts_as_a_reset() -> None:
    tracker = OffsetTracker()
    tracker.track(T, 0, 3)
    tracker.track(T, 0, 4)
    tracker.finish(T, 0, 3)
    tracker.track(T, 0, 4)  # redelivered after a seek to 4
    assert tracker.pending(T, 0) == 1
    assert tracker.committable() == {}
    tracker.finish(T, 0, 4)
    assert tracker.committable() == {(T, 0): 5}


def test_forget_drops_partition_state() -> None:
    tracker = OffsetTracker()
    tracker.track(T, 0, 1)
    tracker.track(T, 1, 1)
    tracker.finish(T, 0, 1)
    tracker.forget(T, 0)
    tracker.forget(T, 7)  # unknown: ignored
    assert tracker.committable() == {}
    assert tracker.pending() == 1
    assert not tracker.finish(T, 0, 1)
    assert tracker.partitions() == [(T, 1)]
    # Reassigned later: starts afresh from wherever the consumer resumes.
    tracker.track(T, 0, 40)
    tracker.finish(T, 0, 40)
    assert tracker.committable() == {(T, 0): 41}


def test_memory_is_bounded_by_in_flight_offsets() -> None:
    tracker = OffsetTracker()
    tracker.track(T, 0, 0)  # stuck: never finishes
    for offset in range(1, 100_001):
        tracker.track(T, 0, offset)
        tracker.finish(T, 0, offset)
    state = tracker._partitions[(T, 0)]
    assert state.unfinished == [0]
    assert tracker.committable() == {}
    tracker.finish(T, 0, 0)
    assert tracker.committable() == {(T, 0): 100_001}


# ---------------------------------------------------------------------------------------
# Property test: the tracker against a deliberately naive reference model.


class _Reference:
    """Remembers every offset since the last reset; recomputes everything from scratch."""

    def __init__(self, start: int) -> None:
        self.tracked: list[int] = [start]
        self.finished: set[int] = set()
        self.floor = start

    def position(self) -> int:
        unfinished = [o for o in self.tracked if o not in self.finished]
        return min(unfinished) if unfinished else max(self.finished) + 1


PARTITIONS = [("a", 0), ("a", 1), ("b", 0)]


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of consume / finish / commit / revoke across partitions."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = OffsetTracker()
        self.model: dict[tuple[str, int], _Reference] = {}

    @rule(key=st.sampled_from(PARTITIONS), gap=st.integers(1, 3))
    def consume_next(self, key: tuple[str, int], gap: int) -> None:
        ref = self.model.get(key)
        offset = ref.tracked[-1] + gap if ref else gap * 10
        self.tracker.track(*key, offset)
        if ref is None:
            self.model[key] = _Reference(offset)
        else:
            ref.tracked.append(offset)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def seek_backwards(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        offset = data.draw(st.integers(0, self.model[key].tracked[-1]))
        self.tracker.track(*key, offset)
        self.model[key] = _Reference(offset)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def finish_some(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        ref = self.model[key]
        # Mostly real in-flight offsets, sometimes duplicates / gaps / strangers.
        offset = data.draw(
            st.sampled_from(ref.tracked) | st.integers(0, ref.tracked[-1] + 5), label="offset"
        )
        expected = offset in ref.tracked and offset not in ref.finished
        assert self.tracker.finish(*key, offset) == expected
        if expected:
            ref.finished.add(offset)

    @rule(key=st.sampled_from(PARTITIONS), offset=st.integers(0, 100))
    def finish_unknown_partition_or_offset(self, key: tuple[str, int], offset: int) -> None:
        ref = self.model.get(key)
        expected = ref is not None and offset in ref.tracked and offset not in ref.finished
        assert self.tracker.finish(*key, offset) == expected
        if expected:
            ref.finished.add(offset)

    @rule()
    def commit(self) -> None:
        positions = self.tracker.committable()
        self.tracker.mark_committed(positions)
        for key, position in positions.items():
            self.model[key].floor = position
        assert self.tracker.committable() == {}

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.tracker.forget(*key)
        del self.model[key]

    @invariant()
    def matches_reference(self) -> None:
        expected = {
            key: ref.position() for key, ref in self.model.items() if ref.position() > ref.floor
        }
        assert self.tracker.committable() == expected
        for key, ref in self.model.items():
            in_flight = [o for o in ref.tracked if o not in ref.finished]
            assert self.tracker.pending(*key) == len(in_flight)
            state = self.tracker._partitions[key]
            assert state.unfinished == in_flight  # memory: exactly the in-flight offsets
            for offset in range(ref.tracked[0], ref.tracked[-1] + 2):
                assert self.tracker.is_tracked(*key, offset) == (offset in in_flight)
        assert set(self.tracker.partitions()) == set(self.model)


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
