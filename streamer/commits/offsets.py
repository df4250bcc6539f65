"""Commit watermarks for out-of-order completion.

Kafka stores one committed offset per partition, meaning "every record below this offset
is done". Generation requests finish in any order, so the committable position of a
partition is the lowest offset that is still in flight, or one past the highest finished
offset when nothing is in flight.

:class:`OffsetTracker` is pure bookkeeping: no I/O, no asyncio, no logging. The consumer
loop calls :meth:`~OffsetTracker.track` when it hands a record to a worker,
:meth:`~OffsetTracker.finish` once the record's outcome is published and acknowledged,
and periodically commits :meth:`~OffsetTracker.committable` followed by
:meth:`~OffsetTracker.mark_committed`.

Memory is proportional to the number of unfinished offsets: finished offsets are dropped
as soon as they are finished, and only a few integers per partition are kept besides.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = ["OffsetTracker", "TopicPartitionKey"]

TopicPartitionKey = tuple[str, int]


@dataclass(slots=True)
class _PartitionState:
    """Bookkeeping for one partition since it was first tracked (or last reset)."""

    # Tracked-but-unfinished offsets, ascending. Offsets are tracked in increasing order,
    # so tracking is an append; finishing deletes from anywhere (bisect + del), which is a
    # memmove of at most the in-flight count and keeps memory exactly that big.
    unfinished: list[int] = field(default_factory=list)
    # Highest offset tracked so far: a track() at or below it is a backwards jump.
    last_tracked: int = -1
    # Highest offset finished so far, or None when nothing finished since the (re)start.
    high_finished: int | None = None
    # Position at or below which there is nothing new to commit: the last committed
    # position, or the position consumption started from.
    floor: int = 0

    def position(self) -> int | None:
        """The offset to commit: everything below it is finished (None: nothing known)."""
        if self.unfinished:
            return self.unfinished[0]
        if self.high_finished is not None:
            return self.high_finished + 1
        return None

    def index_of(self, offset: int) -> int | None:
        """Index of ``offset`` in :attr:`unfinished`, or None when it is not in flight."""
        i = bisect_left(self.unfinished, offset)
        if i < len(self.unfinished) and self.unfinished[i] == offset:
            return i
        return None


class OffsetTracker:
    """Per-partition commit watermarks over records that finish out of order.

    Offsets need not be contiguous (compacted topics and transaction markers leave gaps):
    the committable position is the lowest unfinished tracked offset, which already skips
    any gap below it, or the highest finished offset + 1 when nothing is in flight.
    """

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset`` was consumed and is now in flight.

        Offsets normally arrive strictly increasing per partition. An offset at or below
        the last tracked one means the consumer was repositioned (seek, rebalance, broker
        failover): the partition's state restarts from the new position instead of
        failing, because the records above it will be delivered again.
        """
        key = (topic, partition)
        state = self._partitions.get(key)
        if state is None or offset <= state.last_tracked:
            # Everything below the (new) start position is, by definition, someone
            # else's business: it was committed before, or skipped on purpose.
            state = _PartitionState(floor=offset)
            self._partitions[key] = state
        state.unfinished.append(offset)
        state.last_tracked = offset

    def finish(self, topic: str, partition: int, offset: int) -> bool:
        """Mark ``offset`` done (its outcome is published and acknowledged).

        Returns True when the offset was in flight. Finishing an offset that is not
        tracked (unknown partition, already finished, or dropped by a reset or
        :meth:`forget`) is a no-op returning False: late completions after a rebalance
        are normal and must not disturb the new owner's state.
        """
        state = self._partitions.get((topic, partition))
        if state is None:
            return False
        i = state.index_of(offset)
        if i is None:
            return False
        del state.unfinished[i]
        if state.high_finished is None or offset > state.high_finished:
            state.high_finished = offset
        return True

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Positions to commit: for each partition that progressed past its last commit."""
        positions: dict[TopicPartitionKey, int] = {}
        for key, state in self._partitions.items():
            position = state.position()
            if position is not None and position > state.floor:
                positions[key] = position
        return positions

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        """Record that ``positions`` were committed, so they are not reported again.

        Unknown (forgotten) partitions are ignored. A position below the last recorded
        one is ignored too: commits may be acknowledged out of order, and an older one
        must not make already-committed progress look new.
        """
        for key, position in positions.items():
            state = self._partitions.get(key)
            if state is not None and position > state.floor:
                state.floor = position

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition's state (it was revoked); unknown partitions are ignored."""
        self._partitions.pop((topic, partition), None)

    def position(self, topic: str, partition: int) -> int | None:
        """What a commit would leave: the lowest unfinished offset, else one past the highest
        finished, else where consumption started (None: the partition is unknown)."""
        state = self._partitions.get((topic, partition))
        if state is None:
            return None
        position = state.position()
        return state.floor if position is None else position

    def pending(self, topic: str | None = None, partition: int | None = None) -> int:
        """Number of tracked-but-unfinished offsets, optionally for one topic/partition."""
        return sum(
            len(state.unfinished)
            for (t, p), state in self._partitions.items()
            if (topic is None or t == topic) and (partition is None or p == partition)
        )

    def is_tracked(self, topic: str, partition: int, offset: int) -> bool:
        """True while ``offset`` is in flight (tracked and not yet finished)."""
        state = self._partitions.get((topic, partition))
        return state is not None and state.index_of(offset) is not None

    def partitions(self) -> list[TopicPartitionKey]:
        """The partitions that currently have state (tracked and not forgotten)."""
        return list(self._partitions)
