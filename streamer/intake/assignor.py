"""The workers' partition assignor: balanced per lane, sticky across rebalances.

aiokafka's sticky assignor balances the total count of partitions a member owns, not each topic:
with two workers and four lanes of 12 partitions it may give one worker every partition of the
`normal` lane (measured: docs/benchmarks.md, "Prefix-affine routing"), so one worker serves half
the traffic and the other idles. Round-robin balances each lane but moves most partitions at every
membership change. This assignor does both: each lane's partitions are split as evenly as the
members allow (every member owns floor or ceil of P/N of each lane), and within that every member
keeps as many of the partitions it owned before as its share allows. Members report what they
own in their join metadata (`user_data`), as Kafka's sticky assignors do.

`plan` is the pure rule (unit-tested); the class adapts it to aiokafka's assignor interface.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

Owned = Mapping[str, Iterable[int]]  # topic -> partitions


def plan(partitions: Mapping[str, Iterable[int]],
         members: Mapping[str, tuple[Iterable[str], Owned]]) -> dict[str, dict[str, list[int]]]:
    """Assign every partition of every topic to one subscribed member.

    `partitions`: topic -> its partitions; `members`: member id -> (subscribed topics, what it
    owned before). Per topic, members that owned more of it before get the larger shares first;
    a partition claimed by two members (a zombie) goes to the first in id order."""
    out: dict[str, dict[str, list[int]]] = {m: {} for m in members}
    for topic in sorted(partitions):
        all_parts = sorted(set(partitions[topic]))
        subscribed = sorted(m for m, (topics, _) in members.items() if topic in set(topics))
        if not subscribed or not all_parts:
            continue
        before = {m: [p for p in sorted(set(members[m][1].get(topic, ()))) if p in all_parts]
                  for m in subscribed}
        base, extra = divmod(len(all_parts), len(subscribed))
        by_claim = sorted(subscribed, key=lambda m: (-len(before[m]), m))
        quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_claim)}
        taken: set[int] = set()
        mine: dict[str, list[int]] = {m: [] for m in subscribed}
        for m in by_claim:  # keep what each owned, up to its share
            for p in before[m]:
                if len(mine[m]) < quota[m] and p not in taken:
                    mine[m].append(p)
                    taken.add(p)
        free = [p for p in all_parts if p not in taken]
        for m in by_claim:  # then fill the shares with what nobody kept
            while len(mine[m]) < quota[m]:
                mine[m].append(free.pop(0))
        for m in subscribed:
            if mine[m]:
                out[m][topic] = sorted(mine[m])
    return out


class LaneStickyAssignor(AbstractPartitionAssignor):
    """Balanced per lane, sticky within that (see the module docstring)."""

    name = "streamer-lane-sticky"
    version = 0
    _owned: ClassVar[dict[str, list[int]]] = {}  # what this process's member owns

    @classmethod
    def assign(cls, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = {t for meta in members.values() for t in meta.subscription}
        partitions = {t: sorted(cluster.partitions_for_topic(t) or ()) for t in topics}
        result = plan(partitions, {m: (meta.subscription, _decode(meta.user_data))
                                   for m, meta in members.items()})
        return {m: ConsumerProtocolMemberAssignment(cls.version, sorted(result[m].items()), b"")
                for m in members}

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        owned = json.dumps(cls._owned, sort_keys=True).encode()
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), owned)

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        owned: dict[str, list[int]] = {}
        for tp in assignment.partitions():
            owned.setdefault(tp.topic, []).append(tp.partition)
        cls._owned = {t: sorted(ps) for t, ps in owned.items()}


def _decode(user_data: bytes | None) -> dict[str, list[int]]:
    """A member's previous assignment from its join metadata; anything unreadable is nothing."""
    try:
        raw = json.loads(user_data or b"{}")
        return {str(t): [int(p) for p in ps] for t, ps in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}
