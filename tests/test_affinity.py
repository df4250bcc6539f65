"""Prefix-affine routing and production topic handling, with real broker and worker processes.

A session key on the request record picks its partition, so one session's requests reach one
worker, while outputs stay keyed by the request id. Workers run with `--no-apply-topics` and
static membership (`--group-instance-id`), as the deploy files run them. `streamer bench
affinity` is checked end to end (slow: two fleets).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import (
    ROOT,
    WorkerProc,
    ids_on_every_partition,
    partition_of,
    partitions_of,
    until,
)

from streamer import protocol
from streamer.bench.affinity import Turn, ceiling_hits
from streamer.config import KafkaSettings
from streamer.engine.model import load_tokenizer
from streamer.protocol import EventType
from streamer.topics import missing_topics, worker_topics

pytestmark = pytest.mark.kafka


def _assigned_count(worker: WorkerProc) -> int:
    """Partitions the worker holds after its latest rebalance (0 before its first)."""
    counts = [json.loads(line)["count"] for line in worker.log().splitlines()
              if '"partitions_assigned"' in line and line.startswith("{")]
    return counts[-1] if counts else 0


async def test_one_session_lands_on_one_worker(start_worker, client, prefix) -> None:
    # range: each lane's partitions split between the workers (sticky balances the count over
    # all four lanes together and may leave the whole normal lane on one worker).
    workers = [start_worker("--no-apply-topics", "--group-instance-id", f"{prefix}-{i}",
                            "--assignor", "range") for i in range(2)]
    every = sum(partitions_of(t) for t in worker_topics(prefix)[:4])  # the four lanes
    await until(lambda: all(_assigned_count(w) > 0 for w in workers)
                and sum(_assigned_count(w) for w in workers) == every, what="group settled")

    partitions = partitions_of(protocol.request_topic(prefix, "normal"))
    sessions = ids_on_every_partition(f"conv-{uuid.uuid4().hex[:6]}", partitions)
    handles = {}
    for session in sessions:
        # Two turns whose ids land on different partitions: keyed by id they could split.
        first, second = (f"{session}-turn-{n}" for n in (0, 1))
        n = 1
        while partition_of(second, partitions) == partition_of(first, partitions):
            n += 1
            second = f"{session}-turn-{n}"
        handles[session] = [await client.submit(f"hello from {session}", request_id=rid,
                                                session=session, max_tokens=4)
                            for rid in (first, second)]
    results = {s: await asyncio.gather(*(h.result(120) for h in hs)) for s, hs in handles.items()}

    serving = {}
    for session, turns in results.items():
        assert all(r.outcome.type is EventType.COMPLETED for r in turns), session
        started = {e.worker for r in turns for e in r.events if e.type is EventType.STARTED}
        assert len(started) == 1, (session, started)  # both turns on one worker
        serving[session] = started.pop()
    # One session per partition: both workers own some, so both served some sessions.
    assert set(serving.values()) == {"w0", "w1"}


async def test_no_apply_topics_names_the_missing_topic_and_creates_nothing(
    start_worker, kafka_settings: KafkaSettings
) -> None:
    other = f"n{uuid.uuid4().hex[:8]}"
    tokens = protocol.tokens_topic(other)
    admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1) for name in worker_topics(other)
                                   if name != tokens])
    finally:
        await admin.close()
    worker = start_worker("--no-apply-topics", "--prefix", other, wait=False)
    assert await asyncio.to_thread(worker.process.wait, 120) == 1
    log = worker.log()
    assert f"streamer worker: topics missing: {tokens}. This worker does not create topics" in log
    assert "streamer topics apply" in log
    assert await missing_topics(kafka_settings, worker_topics(other)) == [tokens]


def test_ceiling_counts_whole_blocks_of_the_previous_turn(tiny_model) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    first = [{"role": "system", "content": "model cache layer " * 12},
             {"role": "user", "content": "what is a broker"}]
    answer = tokenizer(" a broker is a partition", add_special_tokens=False).input_ids
    second = [*first, {"role": "assistant", "content": tokenizer.decode(answer)},
              {"role": "user", "content": "and an offset"}]
    turns = [Turn(0, 0, first, outcome="completed", token_ids=tuple(answer)),
             Turn(0, 1, second, outcome="completed", token_ids=(5, 6))]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for m in (first, second)]
    hits, total = ceiling_hits(turns, tokenizer, block_size=16)
    assert total == len(ids[0]) + len(ids[1])
    assert hits % 16 == 0 and 16 <= hits <= len(ids[0]) + len(answer) - 1
    assert ceiling_hits(turns[:1], tokenizer, block_size=16)[0] == 0  # a first turn never hits


@pytest.mark.slow
def test_bench_affinity_session_reaches_the_ceiling(tmp_path, tiny_model) -> None:
    """Keyed by session, every turn finds its history cached: the fleet's hits are the
    ceiling's; keyed by id they can only be fewer."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "bench", "affinity", "--model", str(tiny_model),
         "--conversations", "3", "--turns", "3", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "affinity.json").read_text())
    session, by_id = data["modes"]["session"], data["modes"]["id"]
    assert session["failed"] == by_id["failed"] == 0
    assert session["queries"] == by_id["queries"] == data["ceiling_prompt_tokens"]
    assert session["hits"] == data["ceiling_hits"] > 0
    assert session["conversations_split"] == 0
    assert by_id["hits"] <= session["hits"]
    assert "| session |" in (out / "affinity.md").read_text()


def test_bench_affinity_flags() -> None:
    from streamer.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "affinity", "--modes", "session", "--turns", "2"])
    assert args.modes == ("session",) and args.turns == 2 and callable(args.func)
    assert args.worker_flags == "--assignor range"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "affinity", "--modes", "session,tenant"])
