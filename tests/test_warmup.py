"""Warm-up: the plan (pure), an engine it leaves exactly as it found it, and a worker that warms up
before it joins its group and publishes nothing while doing so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer import protocol
from streamer.config import EngineConfig, KafkaSettings
from streamer.engine import warmup
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams
from streamer.health.monitor import Health
from streamer.observability.metrics import WorkerMetrics


def test_plan_covers_a_short_and_the_longest_prefill_and_every_decode_size() -> None:
    p = warmup.plan(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=2048,
                    num_blocks=1000, block_size=16)
    assert p.prefill_lens == (16, 512)
    assert p.decode_batches == (1, 2, 4, 8, 16, 32, 64)
    # Bounded by the context, the KV blocks and the step budget.
    small = warmup.plan(max_num_batched_tokens=8, max_num_seqs=6, max_model_len=64,
                        num_blocks=2, block_size=4)
    assert small.prefill_lens == (8,) and small.decode_batches == (1, 2, 4, 6)
    steps = warmup.batches(small, num_blocks=2, block_size=4, vocab=50)
    assert all(b < 2 for s in steps for t in s.block_tables for b in t)


def _engine(model: Path, warm: bool) -> Engine:
    return Engine(EngineConfig(model=str(model), max_num_seqs=8, max_num_batched_tokens=64,
                               kv_cache_bytes=8 << 20, warmup=warm))


async def _tokens(engine: Engine, prompt_ids: list[int]) -> list[int]:
    stream = engine.add("r", prompt_ids, SamplingParams(max_tokens=12, ignore_eos=True))
    tokens: list[int] = []
    async for out in stream:
        if out.kind is OutputKind.TOKENS:
            tokens += out.token_ids
    return tokens


async def test_warmup_leaves_no_cache_entry_and_no_written_block(tiny_model: Path) -> None:
    # The warm-up's own prefill tokens, as a prompt: were its blocks reachable, this would hit.
    prompt = [i % 50 for i in range(40)]
    async with _engine(tiny_model, warm=False) as cold:
        expected = await _tokens(cold, prompt)
    async with _engine(tiny_model, warm=True) as engine:
        assert engine.blocks is not None and engine.pipeline is not None
        assert engine.blocks.stats.cached_blocks == 0 and engine.blocks.stats.used_blocks == 0
        for stage in engine.pipeline.stages:
            assert stage.pool is not None
            assert all(not torch.any(t) for t in (*stage.pool.k, *stage.pool.v))
        assert not engine.warming
        assert await _tokens(engine, prompt) == expected
        assert engine.blocks.stats.hit_tokens == 0
        # While warming, /readyz (and streamer_ready) say not ready, whatever else holds.
        health = Health(engine, WorkerMetrics(process_metrics=False), probe=lambda _: True,
                        assigned=lambda: True, control_alive=lambda: True, on_tick=lambda: None,
                        stall_timeout_s=60, devices=("cpu",))
        assert health.ready() == (True, "ok")
        engine.warming = True
        assert health.ready() == (False, "warming up")
        engine.warming = False


@pytest.mark.kafka
async def test_worker_warms_up_before_joining_and_publishes_nothing(
        start_worker, client, kafka_settings: KafkaSettings, prefix: str) -> None:
    worker = start_worker()
    log = worker.log()
    assert '"event": "warmup_done"' in log
    assert log.index('"event": "warmup_done"') < log.index('"event": "partitions_assigned"')
    # Nothing reached the output topics before the first request.
    consumer = AIOKafkaConsumer(**kafka_settings.client_kwargs())
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for topic in (protocol.tokens_topic(prefix),
                                                      protocol.events_topic(prefix))
               for p in sorted(await _partitions(consumer, topic))]
        assert set((await consumer.end_offsets(tps)).values()) == {0}
    finally:
        await consumer.stop()
    result = await (await client.submit("warm worker", max_tokens=4)).result(120)
    assert result.outcome.type is protocol.EventType.COMPLETED


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()
    return consumer.partitions_for_topic(topic) or set()
