"""Broker-side checks shared by tests (real consumers, no worker internals)."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer import protocol
from streamer.config import consumer_group


async def committed_reaches_end(kafka_settings, prefix: str, timeout: float = 90) -> dict:  # type: ignore[no-untyped-def]
    """Poll until the group's committed offset equals the end offset of every request partition."""
    consumer = AIOKafkaConsumer(**kafka_settings.client_kwargs(), group_id=consumer_group(prefix),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(protocol.request_topic(prefix, p), i)
               for p in protocol.PRIORITIES
               for i in sorted(consumer.partitions_for_topic(protocol.request_topic(prefix, p))
                               or await _partitions(consumer, protocol.request_topic(prefix, p)))]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while True:
            committed = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
            behind = {tp: (committed[tp], ends[tp]) for tp in tps if committed[tp] < ends[tp]}
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()
    return consumer.partitions_for_topic(topic) or set()


async def read_records(kafka_settings, topic: str, partitions: int  # type: ignore[no-untyped-def]
                       ) -> list[tuple[str, bytes | None]]:
    """(key, value) of every record of a topic, from the beginning to its current end."""
    consumer = AIOKafkaConsumer(**kafka_settings.client_kwargs(), group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[str, bytes | None]] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                out += [(r.key.decode() if r.key else "", r.value) for r in batch.get(tp, [])]
        return out
    finally:
        await consumer.stop()
