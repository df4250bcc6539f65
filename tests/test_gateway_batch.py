"""The Batch API through a real gateway, broker and worker: 50 JSONL lines run on the low lane
and all 50 results arrive although the gateway is killed (SIGKILL) and restarted mid-batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from gateway_helpers import Gateways

from streamer import protocol
from streamer.config import KafkaSettings

pytestmark = pytest.mark.kafka

LINES = 50


async def read_until(kafka: KafkaSettings, topic: str, enough: Callable[[list], bool],
                     timeout: float = 180) -> list:
    """Records of `topic` from its beginning until `enough(records)` (counted by reading: the
    embedded broker's end offsets undercount batches of several records)."""
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list = []
        deadline = asyncio.get_running_loop().time() + timeout
        while not enough(records):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic}: only {len(records)} records")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def terminal_ids(records: list) -> set[str]:
    return {r.key.decode() for r in records
            if protocol.decode_event(r.value).type.is_terminal}


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def test_a_batch_of_50_survives_gateway_restarts(
    start_worker, gate, kafka_settings, kafka_bootstrap, prefix, tiny_model, tmp_path
) -> None:
    gate.hold()  # nothing runs until the batch is in the lane and the first gateway is dead
    start_worker("--max-num-seqs", "4", gate=gate)
    gateways = Gateways(kafka_bootstrap, tmp_path)
    db = tmp_path / "batches.db"
    try:
        first = gateways.start(prefix, db=db)
        await asyncio.to_thread(first.wait_ready)
        lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": tiny_model.name, "max_tokens": 4,
                           "messages": [{"role": "user", "content": f"Question number {i}"}]}}
                 for i in range(LINES)]
        content = "\n".join(json.dumps(line) for line in lines).encode()
        upload = await sdk(first.url).files.create(file=("in.jsonl", content), purpose="batch")
        assert (await sdk(first.url).files.content(upload.id)).content == content
        batch = await sdk(first.url).batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.status == "in_progress" and batch.request_counts.total == LINES

        low = protocol.request_topic(prefix, "low")
        # Every line is on the low lane; none has run (the gate holds).
        await read_until(kafka_settings, low, lambda records: len(records) >= LINES)
        first.kill()  # SIGKILL mid-batch: no line has an outcome yet

        second = gateways.start(prefix, db=db)
        held = await sdk(second.url).batches.retrieve(batch.id)
        assert held.status == "in_progress" and held.request_counts.completed == 0
        gate.release()

        async def progress(url: str) -> int:
            return (await sdk(url).batches.retrieve(batch.id)).request_counts.completed

        for _ in range(2400):
            if await progress(second.url) >= 1:
                break
            await asyncio.sleep(0.05)
        second.kill()  # again, with some results recorded (how many depends on the machine)
        # Every outcome reaches Kafka while no gateway runs.
        await read_until(kafka_settings, protocol.events_topic(prefix),
                         lambda records: len(terminal_ids(records)) >= LINES)

        third = gateways.start(prefix, db=db)
        done = {"status": ""}

        async def finished() -> None:
            while True:
                found = await sdk(third.url).batches.retrieve(batch.id)
                if found.status in ("completed", "failed", "cancelled"):
                    done["batch"] = found  # type: ignore[assignment]
                    return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(finished(), 180)
        final = done["batch"]
        assert final.status == "completed"  # type: ignore[attr-defined]
        assert final.request_counts.completed == LINES  # type: ignore[attr-defined]
        assert final.request_counts.failed == 0  # type: ignore[attr-defined]
        output = (await sdk(third.url).files.content(final.output_file_id)).text  # type: ignore[attr-defined]
        results = [json.loads(line) for line in output.splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(x["custom_id"] for x in lines)
        for result in results:
            assert result["response"]["status_code"] == 200
            body = result["response"]["body"]
            assert body["object"] == "chat.completion"
            assert 1 <= body["usage"]["completion_tokens"] <= 4
        # Nothing was produced twice: the lane holds the 50 lines only.
        lane = await read_until(kafka_settings, low, lambda records: len(records) >= LINES)
        assert sorted(r.key.decode() for r in lane) == sorted(r["response"]["request_id"]
                                                              for r in results)
    finally:
        gateways.close()
