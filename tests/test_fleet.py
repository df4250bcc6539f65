"""Fleet behaviour with real worker processes: failover, joins, drains, the supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, ids_on_every_partition, partitions_of, until
from kafka_helpers import read_records
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import RequestHandle, Result
from streamer.config import KafkaSettings
from streamer.protocol import Event, EventType, TokenChunk, Usage

pytestmark = pytest.mark.kafka


def _started(handle: RequestHandle) -> list[Event]:
    return [e for e in handle.events if e.type is EventType.STARTED]


def _started_by(handle: RequestHandle) -> list[str]:
    return [e.worker for e in _started(handle)]


def _has(handle: RequestHandle, kind: EventType) -> bool:
    return any(e.type is kind for e in handle.events)


def _outcome_names_the_last_attempt(result: Result) -> bool:
    started = [e.attempt for e in result.events if e.type is EventType.STARTED]
    return bool(started) and result.outcome.attempt == started[-1]


async def _read_topic(kafka: KafkaSettings, topic: str) -> list[bytes]:
    """Every record value of a topic, from the beginning to its current end."""
    records = await read_records(kafka, topic, partitions_of(topic))
    return [value for _, value in records if value is not None]


async def test_kill_one_of_two_workers_then_add_a_third(
    start_worker, client, tiny_model, gate
) -> None:
    """40 requests; SIGKILL a worker mid-generation, add a third: all complete, none lost.

    The gate holds w0's requests at 5 tokens, so the kill finds them mid-generation however
    fast the machine is."""
    gate.hold_at(5)
    # Both join the group's first generation together (one join, not a join and a rebalance).
    first = start_worker("--max-num-seqs", "4", gate=gate, wait=False)
    second = start_worker("--max-num-seqs", "4", wait=False)
    await first.await_for("partitions_assigned")
    await second.await_for("partitions_assigned")
    max_tokens = 48
    # Off the event loop: blocking it for seconds starves the client's Kafka connections.
    expected = await asyncio.to_thread(lambda: [
        greedy_text(tiny_model, PROMPTS[i % len(PROMPTS)] + f" #{i}", max_tokens, ignore_eos=True)
        for i in range(40)])
    handles = [await client.submit(PROMPTS[i % len(PROMPTS)] + f" #{i}",
                                   priority=protocol.PRIORITIES[i % 4], max_tokens=max_tokens,
                                   ignore_eos=True) for i in range(40)]
    await until(lambda: any("w0" in _started_by(h) for h in handles), what="w0 serving")
    killed_at = time.time()
    first.kill()
    victims = [h for h in handles if "w0" in _started_by(h)]
    assert not any(h.done for h in victims)  # held at 5 of 48 tokens
    third = start_worker("--max-num-seqs", "4", wait=False)
    results = await asyncio.gather(*(h.result(300) for h in handles))
    resumed_at = min(
        (e.ts for h in victims for e in h.events
         if e.type is EventType.STARTED and e.worker != "w0"), default=None)
    redelivered = sum(1 for r in results if r.attempts_seen >= 2)
    print(f"\nkilled w0 with {len(victims)} requests in flight; first restart "
          f"{(resumed_at / 1000 - killed_at) if resumed_at else float('nan'):.1f}"
          f" s after the kill; {redelivered} requests served more than once; "
          f"workers that finished: { {r.outcome.worker for r in results} }")
    assert all(r.outcome.type is EventType.COMPLETED for r in results)
    assert [r.text for r in results] == expected
    for result, handle in zip(results, handles, strict=True):
        assert _outcome_names_the_last_attempt(result)  # its chunks are the text used
        if handle in victims:  # restarted elsewhere with a new attempt
            started = [e for e in result.events if e.type is EventType.STARTED]
            assert started[0].worker == "w0" and result.outcome.worker != "w0"
            assert len({e.attempt for e in started}) == len(started) >= 2
    # The third worker took partitions and serves its share: requests on every partition, in
    # rounds, until one is served by w2 (it owns some partitions once the group settles).
    await third.await_for("partitions_assigned")
    partitions = partitions_of(protocol.request_topic(client.prefix, "normal"))
    served_by: set[str] = set()
    for round_ in range(20):
        ids = ids_on_every_partition(f"join{round_}", partitions)
        later = [await client.submit(f"after the join {i}", request_id=rid, max_tokens=4)
                 for i, rid in enumerate(ids)]
        served_by |= {(await h.result(120)).outcome.worker for h in later}
        if "w2" in served_by:
            break
    assert "w2" in served_by, served_by


async def test_sigterm_drains_without_loss(start_worker, client, tiny_model, gate) -> None:
    """Everything in flight at SIGTERM finishes on that worker within the grace period."""
    gate.hold()  # nothing runs before the SIGTERM
    worker = start_worker("--shutdown-grace-s", "30", gate=gate)
    handles = [await client.submit(p, max_tokens=60, ignore_eos=True) for p in PROMPTS[:8]]
    await until(lambda: all(_has(h, EventType.QUEUED) for h in handles), what="all queued")
    worker.process.send_signal(signal.SIGTERM)
    await worker.await_for("worker_stopping")
    gate.release()
    assert await asyncio.to_thread(worker.process.wait, 60) == 0
    assert "worker_stopped" in worker.log()
    results = await asyncio.gather(*(h.result(60) for h in handles))
    assert all(r.outcome.type is EventType.COMPLETED and r.outcome.worker == "w0" for r in results)
    assert [r.text for r in results] == [greedy_text(tiny_model, p, 60, ignore_eos=True)
                                         for p in PROMPTS[:8]]


async def test_sigterm_hands_back_what_does_not_fit_the_grace_period(
    start_worker, client, gate
) -> None:
    """Held at 5 tokens, nothing can finish within the grace period: everything is handed back
    uncommitted and the next owner serves it as a new attempt. (While the gate holds, no length
    past 5 tokens can finish: 60 is enough.)"""
    gate.hold()
    worker = start_worker("--shutdown-grace-s", "0.5", "--max-num-seqs", "2", gate=gate)
    handles = [await client.submit(p, max_tokens=60, ignore_eos=True) for p in PROMPTS[:4]]
    await until(lambda: all(_has(h, EventType.QUEUED) for h in handles), what="all queued")
    gate.hold_at(5)  # one step admits two; they hold at 5 of their 60 tokens
    await until(lambda: sum(1 for h in handles if _started_by(h)) == 2, what="2 running")
    assert worker.terminate(timeout=60) == 0
    assert not any(h.done for h in handles), "nothing was finished, so nothing was committed"
    start_worker()  # the next owner restarts them from the uncommitted offsets
    results = await asyncio.gather(*(h.result(120) for h in handles))
    assert all(r.outcome.type is EventType.COMPLETED and r.outcome.worker == "w1" for r in results)
    assert all(len(r.token_ids) == 60 for r in results)
    for result in results:
        assert _outcome_names_the_last_attempt(result)
        started = [e for e in result.events if e.type is EventType.STARTED]
        assert [e.worker for e in started] in (["w0", "w1"], ["w1"])
        assert len({e.attempt for e in started}) == len(started)
    assert sum(1 for h in handles if "w0" in _started_by(h)) == 2


async def test_a_rebalance_stops_only_the_requests_that_moved(
    start_worker, client, gate, kafka_settings, prefix
) -> None:
    """A joining worker takes partitions from a busy one (sticky assignor). Requests on the
    partitions that moved stop on the old owner (no outcome, no more tokens from that attempt)
    and restart on the new one; requests on the partitions it kept run on, one attempt each."""
    gate.hold()
    first = start_worker("--max-num-seqs", "64", "--max-num-batched-tokens", "2048", gate=gate)
    handles = []
    for lane in protocol.PRIORITIES:  # a request on every request partition of every lane
        partitions = partitions_of(protocol.request_topic(prefix, lane))
        for i, rid in enumerate(ids_on_every_partition(f"moved-{lane}", partitions)):
            handles.append(await client.submit(PROMPTS[i % len(PROMPTS)], request_id=rid,
                                               priority=lane, max_tokens=24, ignore_eos=True))
    await until(lambda: all(_has(h, EventType.QUEUED) for h in handles), what="all queued")
    gate.hold_at(3)  # one step admits all: each holds at 3 of its 24 tokens
    await until(lambda: all(_started(h) for h in handles), what="all running on w0")
    start_worker()  # returns once w1 has partitions
    await first.await_for("partitions_moved")  # w0 knows its new assignment: moved ones stopped
    gate.release()
    results = await asyncio.gather(*(h.result(120) for h in handles))
    assert all(r.outcome.type is EventType.COMPLETED and len(r.token_ids) == 24 for r in results)
    moved = [r for r in results if r.outcome.worker == "w1"]
    kept = [r for r in results if r.outcome.worker == "w0"]
    assert moved, "w1 owns some partitions, and a request waits on every partition"
    assert kept, "the sticky assignor leaves w0 some of its partitions"
    for result in results:
        assert _outcome_names_the_last_attempt(result)
    for result in moved:
        started = [e for e in result.events if e.type is EventType.STARTED]
        assert started[0].worker == "w0" and started[-1].worker == "w1"
        assert len({e.attempt for e in started}) == len(started) >= 2
    for result in kept:  # the rebalance cost them nothing
        assert [e.worker for e in result.events if e.type is EventType.STARTED] == ["w0"]
    # Nothing more will come from w0: what it published is all in the topics now.
    assert first.terminate(timeout=60) == 0
    # Attempts that are not their request's outcome were stopped by the move (all on w0).
    revoked = {e.attempt for r in results for e in r.events
               if e.type is EventType.STARTED and e.attempt != r.outcome.attempt}
    assert revoked
    events = [protocol.decode_event(v) for v in await _read_topic(
        kafka_settings, protocol.events_topic(prefix))]
    chunks = [protocol.decode_chunk(v) for v in await _read_topic(
        kafka_settings, protocol.tokens_topic(prefix))]
    assert not [e for e in events if e.type.is_terminal and e.attempt in revoked]
    assert max((c.index + len(c.token_ids) for c in chunks if c.attempt in revoked), default=0) <= 3


def test_client_keeps_only_the_final_attempts_text() -> None:
    """Pure: chunks of a superseded attempt are dropped; duplicate outcomes are ignored."""
    handle = RequestHandle("r")

    def chunk(attempt: str, index: int, text: str) -> TokenChunk:
        return TokenChunk(request_id="r", attempt=attempt, index=index, token_ids=[index], text=text)

    def event(kind: EventType, attempt: str | None, **fields: object) -> Event:
        return Event(request_id="r", type=kind, attempt=attempt, worker="w", ts=0, **fields)

    handle._on_event(event(EventType.QUEUED, None))
    handle._on_event(event(EventType.STARTED, "a1"))
    handle._on_chunk(chunk("a1", 0, "dead "))
    handle._on_chunk(chunk("a1", 1, "stream"))
    handle._on_event(event(EventType.STARTED, "a2"))
    handle._on_chunk(chunk("a2", 1, " world"))  # out of order across partitions is fine
    completed = event(EventType.COMPLETED, "a2", text="hello world",
                      usage=Usage(prompt_tokens=1, completion_tokens=2))
    handle._on_event(completed)
    assert not handle.done  # the outcome overtook its last chunk: wait for it
    handle._on_chunk(chunk("a2", 0, "hello"))
    assert handle.done
    handle._on_event(event(EventType.FAILED, "a1"))  # a later duplicate outcome: ignored
    result = asyncio.run(handle.result(1))
    assert result.text == "hello world" and result.attempt == "a2"
    assert result.outcome.type is EventType.COMPLETED and result.attempts_seen == 2
    kinds = []
    while not handle._updates.empty():
        kinds.append(handle._updates.get_nowait().kind)
    assert "restart" in kinds


def test_fleet_command_restarts_a_dead_worker_and_stops_cleanly(
    kafka_bootstrap: str, prefix: str, tiny_model: Path, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "fleet", "--workers", "2", "--model", str(tiny_model),
         "--prefix", prefix, "--bootstrap-servers", kafka_bootstrap, "--metrics-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    state = tmp_path / ".streamer" / "fleet.json"

    def worker_pids(changed_from: list[int] | None = None) -> list[int]:
        """The state file's pids, once it exists (and differs from `changed_from`)."""
        deadline = time.monotonic() + 120
        while True:
            try:  # the supervisor rewrites the file in place: a read can see it half-written
                pids = [w["pid"] for w in json.loads(state.read_text())["workers"]]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pids = []
            if pids and pids != changed_from:
                return pids
            assert time.monotonic() < deadline and proc.poll() is None, "no (new) state file"
            time.sleep(0.1)

    try:
        pids = worker_pids()
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        now = worker_pids(changed_from=pids)
        assert now[0] != pids[0] and now[1] == pids[1], "the dead worker was restarted"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b"worker_died" in out
        for pid in now:  # every worker is gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
