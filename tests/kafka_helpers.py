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
