"""The coalescing rule: which engine outputs become one Kafka chunk, and when (clock injected)."""

from __future__ import annotations

import random

from streamer.egress.coalesce import ChunkBudget, Coalescer
from streamer.engine.outputs import OutputKind, RequestOutput


def tok(index: int, text: str | None = None) -> RequestOutput:
    return RequestOutput("r", OutputKind.TOKENS, index=index, token_ids=[100 + index],
                         text=f"t{index} " if text is None else text)


def test_first_token_goes_out_at_once() -> None:
    c = Coalescer(window_s=0.05, max_tokens=64)
    assert c.push(RequestOutput("r", OutputKind.STARTED), 0.0)[0].kind is OutputKind.STARTED
    sent = c.push(tok(0), 0.001)
    assert [(o.index, o.token_ids) for o in sent] == [(0, [100])]
    assert c.deadline() is None  # nothing pending


def test_later_tokens_wait_for_the_window() -> None:
    c = Coalescer(window_s=0.05, max_tokens=64)
    c.push(tok(0), 0.0)
    assert c.push(tok(1), 0.01) == []
    assert c.push(tok(2), 0.02) == []
    assert c.deadline() == 0.05
    assert not c.due(0.049) and c.due(0.05)
    sent = c.push(tok(3), 0.06)  # arrives after the deadline: everything goes, in one chunk
    assert [(o.index, o.token_ids, o.text) for o in sent] == [
        (1, [101, 102, 103], "t1 t2 t3 ")]
    assert c.deadline() is None
    assert c.push(tok(4), 0.07) == [] and c.deadline() == 0.06 + 0.05


def test_flush_on_the_deadline_without_a_new_token() -> None:
    c = Coalescer(window_s=0.05, max_tokens=64)
    c.push(tok(0), 0.0)
    c.push(tok(1), 0.01)
    assert [o.index for o in c.take(0.05)] == [1]  # the serving loop's timer fired
    assert c.take(0.06) == []


def test_flush_when_enough_tokens_wait() -> None:
    c = Coalescer(window_s=10.0, max_tokens=3)
    c.push(tok(0), 0.0)
    assert c.push(tok(1), 0.1) == [] and c.push(tok(2), 0.2) == []
    assert [o.token_ids for o in c.push(tok(3), 0.3)] == [[101, 102, 103]]


def test_everything_pending_goes_before_a_terminal_or_preemption() -> None:
    for kind in (OutputKind.FINISHED, OutputKind.PREEMPTED):
        c = Coalescer(window_s=10.0, max_tokens=64)
        c.push(tok(0), 0.0)
        c.push(tok(1), 0.1)
        sent = c.push(RequestOutput("r", kind), 0.2)
        assert [(o.kind, o.index) for o in sent] == [(OutputKind.TOKENS, 1), (kind, 0)]


def test_zero_window_sends_every_output() -> None:
    c = Coalescer(window_s=0.0, max_tokens=64)
    assert [[o.index for o in c.push(tok(i), i * 1e-3)] for i in range(4)] == [[0], [1], [2], [3]]


def test_chunks_reassemble_exactly_whatever_the_timing() -> None:
    """Random arrival times, windows and held-back deltas (empty texts, as the detokenizer emits
    while a stop string may still begin): indices are contiguous and the text is unchanged."""
    rng = random.Random(5)
    for _ in range(300):
        c = Coalescer(window_s=rng.choice([0.0, 0.01, 0.05]), max_tokens=rng.randint(1, 8))
        texts = [rng.choice(["", "a", "b c", "é", "\n"]) for _ in range(rng.randint(1, 40))]
        now, sent = 0.0, []
        for i, text in enumerate(texts):
            now += rng.uniform(0, 0.03)
            if (deadline := c.deadline()) is not None and rng.random() < 0.3 and now >= deadline:
                sent += c.take(now)
            sent += c.push(tok(i, text), now)
        sent += c.push(RequestOutput("r", OutputKind.FINISHED), now + 1)
        chunks = [o for o in sent if o.kind is OutputKind.TOKENS]
        assert sent[-1].kind is OutputKind.FINISHED
        assert chunks[0].index == 0 and len(chunks[0].token_ids) == 1
        expect = 0
        for chunk in chunks:
            assert chunk.index == expect
            expect += len(chunk.token_ids)
        assert expect == len(texts)
        assert "".join(o.text for o in chunks) == "".join(texts)
        assert all(len(o.token_ids) <= c.max_tokens for o in chunks)


def test_the_budget_stretches_the_window_with_the_streams() -> None:
    budget = ChunkBudget(window_s=0.05, records_per_s=100.0)
    assert budget.window() == 0.05  # no stream yet
    budget.streams = 2
    assert budget.window() == 0.05  # 2 streams at 20 chunks/s each fit in 100 records/s
    budget.streams = 64
    assert budget.window() == 0.64
    assert ChunkBudget(window_s=0.05, records_per_s=0.0, streams=64).window() == 0.05


def test_a_coalescer_follows_its_budget_as_streams_come_and_go() -> None:
    budget = ChunkBudget(window_s=0.05, records_per_s=10.0, streams=1)
    c = Coalescer(window_s=0.05, max_tokens=64, budget=budget)
    c.push(tok(0), 0.0)
    c.push(tok(1), 0.01)
    assert c.deadline() == 0.1  # 1 stream / 10 records/s
    budget.streams = 5
    assert c.deadline() == 0.5 and c.push(tok(2), 0.2) == []
    budget.streams = 1  # others finished: the pending tokens are due now
    assert [o.token_ids for o in c.push(tok(3), 0.2)] == [[101, 102, 103]]


def test_the_budget_never_delays_a_first_token_or_a_terminal() -> None:
    budget = ChunkBudget(window_s=0.05, records_per_s=1.0, streams=1000)
    c = Coalescer(window_s=0.05, max_tokens=64, budget=budget)
    assert [o.index for o in c.push(tok(0), 0.0)] == [0]
    c.push(tok(1), 0.1)
    sent = c.push(RequestOutput("r", OutputKind.FINISHED), 0.2)
    assert [o.kind for o in sent] == [OutputKind.TOKENS, OutputKind.FINISHED]
