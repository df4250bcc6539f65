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
from conftest import ROOT
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import RequestHandle
from streamer.protocol import Event, EventType, TokenChunk, Usage

pytestmark = pytest.mark.kafka


def _started_by(handle: RequestHandle) -> list[str]:
    return [e.worker for e in handle.events if e.type is EventType.STARTED]


async def test_kill_one_of_two_workers_then_add_a_third(start_worker, client, tiny_model) -> None:
    """40 requests; SIGKILL a worker mid-generation, add a third: all complete, none lost."""
    first = start_worker("--max-num-seqs", "4")
    start_worker("--max-num-seqs", "4")
    await first.await_for("partitions_assigned")
    max_tokens = 160
    # Off the event loop: blocking it for seconds starves the client's Kafka connections.
    expected = await asyncio.to_thread(lambda: [
        greedy_text(tiny_model, PROMPTS[i % len(PROMPTS)] + f" #{i}", max_tokens, ignore_eos=True)
        for i in range(40)])
    handles = [await client.submit(PROMPTS[i % len(PROMPTS)] + f" #{i}",
                                   priority=protocol.PRIORITIES[i % 4], max_tokens=max_tokens,
                                   ignore_eos=True) for i in range(40)]
    while not any("w0" in _started_by(h) and not h.done for h in handles):
        assert not all(h.done for h in handles), "everything finished before the kill"
        await asyncio.sleep(0.01)
    killed_at = time.time()
    first.kill()
    victims = [h for h in handles if "w0" in _started_by(h) and not h.done]
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
    assert victims and all(r.attempts_seen >= 2 for r, h in zip(results, handles, strict=True)
                           if h in victims)
    for r in results:  # the outcome names the attempt whose chunks were used
        assert r.outcome.attempt == r.attempt
    # The third worker took partitions and serves its share.
    await third.await_for("partitions_assigned")
    await asyncio.sleep(2)
    later = [await client.submit(f"after the join {i}", max_tokens=4) for i in range(24)]
    served_by = {(await h.result(120)).outcome.worker for h in later}
    assert "w2" in served_by, served_by


async def test_sigterm_drains_without_loss(start_worker, client, tiny_model) -> None:
    worker = start_worker("--shutdown-grace-s", "30")
    handles = [await client.submit(p, max_tokens=60, ignore_eos=True) for p in PROMPTS[:8]]
    while not any(h.events and any(e.type is EventType.STARTED for e in h.events) for h in handles):
        await asyncio.sleep(0.01)
    assert worker.terminate(timeout=60) == 0
    assert "worker_stopped" in worker.log()
    results = await asyncio.gather(*(h.result(60) for h in handles))
    # Everything in flight at SIGTERM finished on that worker within the grace period.
    assert all(r.outcome.type is EventType.COMPLETED and r.outcome.worker == "w0" for r in results)
    assert [r.text for r in results] == [greedy_text(tiny_model, p, 60, ignore_eos=True)
                                         for p in PROMPTS[:8]]


async def test_sigterm_hands_back_what_does_not_fit_the_grace_period(start_worker, client) -> None:
    worker = start_worker("--shutdown-grace-s", "0.5", "--max-num-seqs", "2")
    handles = [await client.submit(p, max_tokens=800, ignore_eos=True) for p in PROMPTS[:4]]
    while sum(1 for h in handles if _started_by(h)) < 2:
        await asyncio.sleep(0.01)
    assert worker.terminate(timeout=60) == 0
    assert not any(h.done for h in handles), "nothing was finished, so nothing was committed"
    start_worker()  # the next owner restarts them from the uncommitted offsets
    results = await asyncio.gather(*(h.result(120) for h in handles))
    assert all(r.outcome.type is EventType.COMPLETED and r.outcome.worker == "w1" for r in results)
    assert all(len(r.token_ids) == 800 for r in results)


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
    try:
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [w["pid"] for w in json.loads(state.read_text())["workers"]]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = [w["pid"] for w in json.loads(state.read_text())["workers"]]
            if now[0] != pids[0]:
                break
            time.sleep(0.2)
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
