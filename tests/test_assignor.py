"""The lane-balanced sticky assignor (pure rule)."""

from __future__ import annotations

import random

from streamer.intake.assignor import LaneStickyAssignor, plan

LANES = [f"llm.requests.{lane}" for lane in ("urgent", "high", "normal", "low")]
PARTS = {t: range(12) for t in LANES}


def _members(owned: dict[str, dict[str, list[int]]]) -> dict[str, tuple[list[str], dict]]:
    return {m: (LANES, o) for m, o in owned.items()}


def _check_complete_and_balanced(result: dict[str, dict[str, list[int]]], n: int) -> None:
    for topic in LANES:
        owners = [p for m in result for p in result[m].get(topic, [])]
        assert sorted(owners) == list(range(12)), "every partition exactly once"
        counts = [len(result[m].get(topic, [])) for m in result]
        assert max(counts) - min(counts) <= 1 and len(counts) == n


def test_every_lane_is_split_evenly_from_scratch() -> None:
    for n in (1, 2, 3, 5, 12, 13):
        result = plan(PARTS, _members({f"m{i}": {} for i in range(n)}))
        _check_complete_and_balanced(result, n)


def test_a_join_moves_only_what_the_newcomer_needs() -> None:
    two = plan(PARTS, _members({"a": {}, "b": {}}))
    three = plan(PARTS, _members({"a": two["a"], "b": two["b"], "c": {}}))
    _check_complete_and_balanced(three, 3)
    for topic in LANES:  # 6+6 -> 4+4+4: each old member keeps 4 of its 6, c gets 2 from each
        for m in ("a", "b"):
            assert set(three[m][topic]) <= set(two[m][topic])
    moved = sum(len(three["c"][t]) for t in LANES)
    assert moved == 16  # the minimum: a third of 48


def test_a_leave_keeps_the_survivors_partitions() -> None:
    three = plan(PARTS, _members({"a": {}, "b": {}, "c": {}}))
    two = plan(PARTS, _members({"a": three["a"], "b": three["b"]}))
    _check_complete_and_balanced(two, 2)
    for topic in LANES:
        for m in ("a", "b"):
            assert set(three[m][topic]) <= set(two[m][topic])


def test_conflicting_claims_and_stale_data_are_resolved() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 6)
        owned = {f"m{i}": {t: rng.sample(range(14), rng.randint(0, 8)) for t in LANES}
                 for i in range(n)}  # overlapping claims, partitions that no longer exist
        _check_complete_and_balanced(plan(PARTS, _members(owned)), n)


def test_members_report_what_they_own() -> None:
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    LaneStickyAssignor.on_assignment(
        ConsumerProtocolMemberAssignment(0, [(LANES[0], [3, 1]), (LANES[2], [0])], b""))
    meta = LaneStickyAssignor.metadata(LANES)
    assert meta.subscription == LANES
    from streamer.intake.assignor import _decode
    assert _decode(meta.user_data) == {LANES[0]: [1, 3], LANES[2]: [0]}
    assert _decode(b"not json") == {}
