"""Resumed attempts: the engine continues an earlier attempt's tokens exactly (in-process, real
model), seeded draws depend on (seed, index) alone, and the client assembles a resumed stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from reference import PROMPTS

from streamer.client import RequestHandle, UpdateKind
from streamer.config import EngineConfig
from streamer.egress.progress import ProgressTrail
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind, RequestOutput
from streamer.engine.sampling import token_seed
from streamer.engine.sequence import Resume, SamplingParams
from streamer.protocol import Event, EventType, Resumed, Segment, TokenChunk, Usage


def _engine(model: Path) -> Engine:
    return Engine(EngineConfig(model=str(model), max_num_seqs=8, max_num_batched_tokens=64,
                               kv_cache_bytes=64 << 20))


async def _outputs(engine: Engine, rid: str, prompt_ids: list[int], params: SamplingParams,
                   resume: Resume | None = None) -> tuple[list[RequestOutput], RequestOutput, int]:
    stream = engine.add(rid, prompt_ids, params, resume=resume)
    chunks: list[RequestOutput] = []
    final = None
    async for out in stream:
        if out.kind is OutputKind.TOKENS:
            chunks.append(out)
        elif out.kind is OutputKind.FINISHED:
            final = out
    assert final is not None
    return chunks, final, stream.resumed_at


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
async def test_a_resumed_sequence_continues_exactly(tiny_model: Path, sampled: bool) -> None:
    """Cut an uninterrupted run at several indices and resume from each: the new outputs start at
    that index, their tokens equal the rest of the run, and the earlier chunks' text + the resumed
    chunks' text is the final text (also with a stop string whose tail is held back)."""
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.5 if sampled else 0.0,
                            top_k=50, seed=77 if sampled else None)
    async with _engine(tiny_model) as engine:
        prompt = engine.tokenizer(PROMPTS[2]).input_ids
        chunks, final, _ = await _outputs(engine, "full", prompt, params)
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 40
        # A stop string taken from the middle of the text: the run stops there, and some
        # chunks before it hold characters back.
        stop = final.final_text[25:28]
        stopped_params = SamplingParams(**{**params.__dict__, "stop": (stop,)})
        stop_chunks, stop_final, _ = await _outputs(engine, "stop", prompt, stopped_params)
        for run_params, run_chunks, run_final in ((params, chunks, final),
                                                  (stopped_params, stop_chunks, stop_final)):
            run_tokens = [t for c in run_chunks for t in c.token_ids]
            for cut in sorted({1, 5, len(run_chunks) // 2, len(run_chunks) - 1} - {0}):
                head = run_chunks[:cut]
                published = "".join(c.text for c in head)
                resume = Resume(tuple(t for c in head for t in c.token_ids), len(published),
                                params.seed)
                rest, again, at = await _outputs(engine, f"r{cut}-{len(run_params.stop)}",
                                                 prompt, run_params, resume)
                assert at == len(resume.token_ids)
                assert rest[0].index == at
                assert [t for c in rest for t in c.token_ids] == run_tokens[at:]
                assert published + "".join(c.text for c in rest) == run_final.final_text
                assert again.final_text == run_final.final_text
                assert again.finish_reason == run_final.finish_reason
                assert again.num_completion_tokens == run_final.num_completion_tokens


async def test_a_resume_that_already_ended_starts_over(tiny_model: Path) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    async with _engine(tiny_model) as engine:
        prompt = engine.tokenizer(PROMPTS[0]).input_ids
        chunks, final, _ = await _outputs(engine, "a", prompt, params)
        done = Resume(tuple(t for c in chunks for t in c.token_ids), len(final.final_text))
        again, again_final, at = await _outputs(engine, "b", prompt, params, done)
    assert at == 0 and again[0].index == 0
    assert again_final.final_text == final.final_text


def test_token_seeds_depend_on_seed_and_index_only() -> None:
    seeds = [token_seed(1234, i) for i in range(1000)]
    assert seeds == [token_seed(1234, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert token_seed(1235, 0) != token_seed(1234, 0)


def _chunk(attempt: str, index: int, text: str) -> TokenChunk:
    return TokenChunk(request_id="r", attempt=attempt, index=index, token_ids=[index], text=text)


def _event(kind: EventType, attempt: str | None, **fields: object) -> Event:
    return Event(request_id="r", type=kind, attempt=attempt, worker="w", ts=0, **fields)


def _updates(handle: RequestHandle) -> list[tuple[str, str]]:
    out = []
    while not handle._updates.empty():
        update = handle._updates.get_nowait()
        if update.kind is not UpdateKind.EVENT:
            out.append((str(update.kind), update.text))
    return out


def test_client_assembles_a_resumed_stream_without_restarting() -> None:
    """a1 published 0..3, its progress said 0..2; a2 resumes at 2. a1's chunk 2 is superseded.
    Live updates continue the shown text where they can, and restart where a1 went too far."""
    handle = RequestHandle("r")
    handle._on_event(_event(EventType.STARTED, "a1"))
    for i, text in enumerate(["He", "llo", " wor"]):
        handle._on_chunk(_chunk("a1", i, text))
    resumed = Resumed(attempt="a1", index=2, segments=[Segment(attempt="a1", start=0, end=2)])
    handle._on_event(_event(EventType.STARTED, "a2", resumed=resumed))
    handle._on_chunk(_chunk("a2", 2, " world"))
    handle._on_event(_event(EventType.COMPLETED, "a2", text="Hello world",
                            usage=Usage(prompt_tokens=1, completion_tokens=3)))
    assert handle.done
    result = asyncio.run(handle.result(1))
    assert result.text == "Hello world" and result.token_ids == [0, 1, 2]
    # a1 had shown 3 tokens, one past the resume point: the display restarts, then replays.
    assert _updates(handle) == [("text", "He"), ("text", "llo"), ("text", " wor"),
                                ("restart", ""), ("text", "He"), ("text", "llo"),
                                ("text", " world")]


def test_client_continues_without_restart_when_the_resume_point_was_shown() -> None:
    handle = RequestHandle("r")
    handle._on_event(_event(EventType.STARTED, "a1"))
    handle._on_chunk(_chunk("a1", 0, "Hi"))
    resumed = Resumed(attempt="a1", index=1, segments=[Segment(attempt="a1", start=0, end=1)])
    # A third attempt resumes the second, which resumed the first: segments name both.
    handle._on_event(_event(EventType.STARTED, "a2", resumed=resumed))
    handle._on_chunk(_chunk("a2", 1, " there"))
    chain = Resumed(attempt="a2", index=2, segments=[Segment(attempt="a1", start=0, end=1),
                                                     Segment(attempt="a2", start=1, end=2)])
    handle._on_chunk(_chunk("a3", 2, "!"))  # its chunk overtakes its started event
    handle._on_event(_event(EventType.STARTED, "a3", resumed=chain))
    handle._on_event(_event(EventType.COMPLETED, "a3", text="Hi there!",
                            usage=Usage(prompt_tokens=1, completion_tokens=3)))
    assert handle.done
    assert asyncio.run(handle.result(1)).text == "Hi there!"
    assert _updates(handle) == [("text", "Hi"), ("text", " there"), ("text", "!")]


def test_failover_bench_counts_tokens_the_final_stream_does_not_use() -> None:
    """a1 published 0..5, a2 resumed at 3: a1's 3, 4 were generated twice. b1 published 0..1,
    b2 started over: both of b1's tokens were."""
    from streamer.bench.failover import _count
    from streamer.client import Result

    def result(rid: str, final: str, started: list[Event]) -> Result:
        done = Event(request_id=rid, type=EventType.COMPLETED, attempt=final, worker="w", ts=0,
                     usage=Usage(prompt_tokens=1, completion_tokens=6))
        return Result(request_id=rid, outcome=done, text="", attempt=final,
                      token_ids=list(range(6)), attempts_seen=len(started),
                      events=[*started, done])

    def chunk(rid: str, attempt: str, index: int) -> TokenChunk:
        return TokenChunk(request_id=rid, attempt=attempt, index=index, token_ids=[index],
                          text="")

    resumed = Resumed(attempt="a1", index=3, segments=[Segment(attempt="a1", start=0, end=3)])
    results = [
        result("a", "a2", [_event(EventType.STARTED, "a1"),
                           _event(EventType.STARTED, "a2", resumed=resumed)]),
        result("b", "b2", [_event(EventType.STARTED, "b1"), _event(EventType.STARTED, "b2")]),
    ]
    chunks = {"a": [chunk("a", "a1", i) for i in range(5)] + [chunk("a", "a2", i)
                                                              for i in range(3, 6)],
              "b": [chunk("b", "b1", i) for i in range(2)] + [chunk("b", "b2", i)
                                                              for i in range(6)]}
    row = _count("crash", True, results, chunks, changed_at=0.0, max_tokens=6)
    assert row["tokens_regenerated"] == 2 + 2
    assert row["requests_retried"] == 2 and row["requests_resumed"] == 1
    assert row["all_complete_and_exact_length"]


class _ProgressSink:
    """The publisher's side of progress records, for the trail's own rule (no broker)."""

    worker = "w0"

    def __init__(self) -> None:
        self.sent: list[int] = []  # tokens covered by each record

    async def send_progress(self, request_id, progress, partition):  # type: ignore[no-untyped-def]
        self.sent.append(len(progress.token_ids))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_progress_record_due_during_a_write_is_written_without_another_chunk() -> None:
    """Chunks 5-8 arrive while the record of 1-4 waits for its acks; no chunk follows (the
    request is held). The record of 8 is still written, after the one of 4, in order."""
    sink = _ProgressSink()
    trail = ProgressTrail(
        sink, asyncio.ensure_future, request_id="r", attempt="a", record=("t", 0, 0),  # type: ignore[arg-type]
        partition=0, prompt_tokens=3, resumed=None, base=([], 0), seed=None, every_tokens=4,
        every_s=1e9)
    loop = asyncio.get_running_loop()
    acks = [loop.create_future() for _ in range(8)]
    for i, ack in enumerate(acks):
        trail.chunk([i], "x", ack)
    for ack in acks:
        ack.set_result(None)
    await trail.settle()
    assert sink.sent == [4, 8]
    assert trail.records == 2



def _trail(sink: _ProgressSink, *, every_tokens: int, every_s: float) -> ProgressTrail:
    return ProgressTrail(
        sink, asyncio.ensure_future, request_id="r", attempt="a", record=("t", 0, 0),  # type: ignore[arg-type]
        partition=0, prompt_tokens=3, resumed=None, base=([], 0), seed=None,
        every_tokens=every_tokens, every_s=every_s)


async def test_the_time_rule_writes_a_record_without_another_chunk() -> None:
    """3 tokens, far below the token rule, then nothing (a held request): the timer of the time
    rule still records them. A closed trail (hand-back, outcome) writes nothing more."""
    sink = _ProgressSink()
    trail = _trail(sink, every_tokens=1000, every_s=0.05)
    loop = asyncio.get_running_loop()
    for i in range(3):
        ack = loop.create_future()
        ack.set_result(None)
        trail.chunk([i], "x", ack)
    async with asyncio.timeout(30):
        while sink.sent != [3]:
            await asyncio.sleep(0.01)
    closed = _trail(_ProgressSink(), every_tokens=1000, every_s=0.05)
    ack = loop.create_future()
    ack.set_result(None)
    closed.chunk([7], "x", ack)
    closed.close()
    assert closed._timer is None and closed._writing is None
    await trail.settle()
    assert trail.records == 1 and trail._timer is None  # everything recorded: no timer left
