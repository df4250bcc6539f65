"""Egress: pure terminal-event builders, and the publisher against a real broker (too large,
broker away and back, stopped while away), and a too-large outcome through a real worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from streamer import protocol
from streamer.broker import EmbeddedBroker
from streamer.client import StreamerClient
from streamer.config import EngineConfig, KafkaSettings, WorkerConfig
from streamer.egress import events
from streamer.egress.publisher import OutputTooLarge, Publisher, PublisherStopped
from streamer.protocol import ErrorCode, EventType
from streamer.topics import apply_topics
from streamer.worker import Worker

CLOCK = events.Clock(produced=100.0, started=100.5, first_token=101.0, now=102.0)


def _outcome(reason: str, **kw) -> protocol.Event:  # type: ignore[no-untyped-def]
    fields = dict(request_id="r", worker="w", attempt="a", priority="low", finish_reason=reason,
                  text="hello", prompt_tokens=3, completion_tokens=2, clock=CLOCK)
    fields.update(kw)
    return events.outcome(**fields)  # type: ignore[arg-type]


def test_outcome_by_finish_reason() -> None:
    done = _outcome("length")
    assert done.type is EventType.COMPLETED and done.text == "hello"
    assert done.usage == protocol.Usage(prompt_tokens=3, completion_tokens=2)
    assert done.timings == protocol.Timings(queue_ms=500.0, ttft_ms=1000.0, e2e_ms=2000.0)
    assert _outcome("cancelled").type is EventType.CANCELLED
    assert _outcome("expired").type is EventType.EXPIRED
    failed = _outcome("failed", error="boom " * 1000)
    assert failed.type is EventType.FAILED and failed.error.code == ErrorCode.MODEL_ERROR
    assert len(failed.error.message) <= events.MAX_MESSAGE_CHARS
    assert _outcome("something new").type is EventType.FAILED


def test_rejections_are_truncated_and_fit_replaces_what_cannot_be_produced() -> None:
    rejected = events.rejected("r", "w", "high", ErrorCode.INVALID_REQUEST, "x" * 50_000)
    assert len(rejected.error.message) == events.MAX_MESSAGE_CHARS
    big = _outcome("eos", text="t" * 5_000)
    assert events.fit(big, 10_000) is big
    small = events.fit(big, 2_000)
    assert small.type is EventType.FAILED and small.error.code == ErrorCode.OUTPUT_TOO_LARGE
    assert small.attempt == "a" and small.request_id == "r"
    assert len(protocol.encode(small)) < 500


@pytest.mark.kafka
async def test_publisher_waits_out_a_broker_outage_and_refuses_the_impossible(
    tmp_path: Path,
) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "b1.log").start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    await apply_topics(kafka, "pub")
    publisher = Publisher(kafka, "pub", "w", max_bytes=10_000)
    await publisher.start()
    try:
        too_large = await publisher.send(publisher.events_topic, b"x" * 20_000, b"k", [])
        with pytest.raises(OutputTooLarge):
            await too_large
        await (await publisher.send(publisher.events_topic, b"before", b"k", []))

        broker.stop()
        pending = await publisher.send(publisher.events_topic, b"during", b"k", [])
        assert publisher.outstanding == 1
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "b2.log").start()
        await apply_topics(kafka, "pub")
        await asyncio.wait_for(pending, 180)  # retried until the broker is back
        assert publisher.outstanding == 0

        broker.stop()
        stranded = await publisher.send(publisher.events_topic, b"never", b"k", [])
        began = time.monotonic()
        await publisher.stop(timeout=2)
        with pytest.raises((PublisherStopped, Exception)):
            await stranded
        assert time.monotonic() - began < 60  # bounded (the guard is "never hangs")
    finally:
        await publisher.stop(timeout=1)
        broker.stop()


@pytest.mark.kafka
async def test_an_outcome_too_large_to_produce_becomes_output_too_large(
    kafka_settings, prefix, tiny_model
) -> None:
    config = WorkerConfig(
        engine=EngineConfig(model=str(tiny_model), kv_cache_bytes=64 << 20),
        kafka=kafka_settings, prefix=prefix, metrics_port=0, worker_id="egress",
    )
    worker = Worker(config)
    worker.publisher.max_bytes = 1_200  # chunks fit, a completed event with the text does not
    task = asyncio.create_task(worker.run())
    try:
        async with StreamerClient(kafka_settings, prefix) as client:
            deadline = time.monotonic() + 90
            while not worker.ready()[0]:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.1)
            small = await client.submit("short", max_tokens=2)
            big = await client.submit("long", max_tokens=300, ignore_eos=True)
            assert (await small.result(120)).outcome.type is EventType.COMPLETED
            outcome = (await big.result(120)).outcome
            assert outcome.type is EventType.FAILED
            assert outcome.error.code == ErrorCode.OUTPUT_TOO_LARGE
            # Both records finished (nothing in flight, nothing left unfinished to commit).
            while worker.offsets.pending() or len(worker.intake.flights):
                assert time.monotonic() < deadline + 120
                await asyncio.sleep(0.1)
            # Both streams left the chunk budget (a leak would stretch every later window).
            assert worker.outcomes.budget.streams == 0
            assert worker.outcomes.budget.window() == config.chunk_ms / 1000
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)
