"""The client reads only the output partitions of its own requests, and grows that assignment
without losing a record (docs/protocol.md, "Reading your own outputs").

Output topics here have different partition counts (tokens 12, events 8), so a client that used
one count for both would read the wrong events partitions. Ids are chosen with aiokafka's own
partitioner (conftest.partition_of), not the client's."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import partition_of, until
from reference import PROMPTS, greedy_text

from streamer import protocol
from streamer.client import RequestHandle, StreamerClient, Update, UpdateKind, grow_assignment
from streamer.config import KafkaSettings
from streamer.protocol import Event, EventType, TokenChunk, Usage
from streamer.topics import apply_topics

pytestmark = pytest.mark.kafka

TOKENS_PARTITIONS, EVENTS_PARTITIONS = 12, 8


async def _make_prefix(kafka: KafkaSettings, tokens: int, events: int) -> str:
    """Fresh topics, the output topics with the given partition counts."""
    name = f"c{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(protocol.tokens_topic(name), tokens, 1),
                                   NewTopic(protocol.events_topic(name), events, 1)])
    finally:
        await admin.close()
    await apply_topics(kafka, name)  # the rest; existing topics are left as they are
    return name


@pytest.fixture
async def prefix(kafka_settings: KafkaSettings) -> str:
    """Overrides conftest's: the worker and the `client` fixture use these topics."""
    return await _make_prefix(kafka_settings, TOKENS_PARTITIONS, EVENTS_PARTITIONS)


@pytest.fixture(scope="module")
async def shared_prefix(kafka_settings: KafkaSettings) -> str:
    """Overrides conftest's: the module's shared worker uses these topics too."""
    return await _make_prefix(kafka_settings, TOKENS_PARTITIONS, EVENTS_PARTITIONS)


def _first_id(stem: str, where: Callable[[str], bool]) -> str:
    return next(rid for rid in (f"{stem}-{i}" for i in itertools.count()) if where(rid))


def _outputs(prefix: str, rid: str, tokens: int = TOKENS_PARTITIONS,
             events: int = EVENTS_PARTITIONS) -> set[TopicPartition]:
    return {TopicPartition(protocol.tokens_topic(prefix), partition_of(rid, tokens)),
            TopicPartition(protocol.events_topic(prefix), partition_of(rid, events))}


def _collect(handle: RequestHandle) -> tuple[list[Update], asyncio.Task[None]]:
    updates: list[Update] = []

    async def run() -> None:
        async for update in handle.updates():
            updates.append(update)

    return updates, asyncio.create_task(run())


def _text_tokens(updates: list[Update]) -> int:
    return sum(u.tokens for u in updates if u.kind is UpdateKind.TEXT)


# The tests that need a worker share one (conftest `shared`), each with a fresh client and its
# own request ids.


async def test_a_client_reads_only_its_requests_partitions(
    shared, shared_client, kafka_settings, tiny_model
) -> None:
    client, prefix = shared_client, shared.prefix
    # Three (tokens, events) partition pairs, distinct in both topics; two requests on each.
    pairs: dict[tuple[int, int], list[str]] = {}
    for rid in (f"only-{n}" for n in itertools.count()):
        pair = (partition_of(rid, TOKENS_PARTITIONS), partition_of(rid, EVENTS_PARTITIONS))
        if any(p[0] == pair[0] or p[1] == pair[1] for p in pairs if p != pair):
            continue
        pairs.setdefault(pair, []).append(rid)
        chosen = {p: ids for p, ids in pairs.items() if len(ids) >= 2}
        if len(chosen) == 3:
            break
    ids = [rid for p in chosen for rid in chosen[p][:2]]
    expected = set().union(*(_outputs(prefix, rid) for rid in ids))
    assert len(expected) == 6  # 3 partitions of each topic

    async with StreamerClient(kafka_settings, prefix) as idle:  # submits nothing
        assert client.assignment == frozenset() == idle.assignment  # start() assigns nothing
        handles = []
        for i, rid in enumerate(ids):
            handles.append(await client.submit(PROMPTS[i], request_id=rid, max_tokens=4 + i))
            assert client.assignment <= expected
        assert client.assignment == expected
        results = await asyncio.gather(*(h.result(180) for h in handles))
        for i, result in enumerate(results):
            assert result.outcome.type is EventType.COMPLETED, result.outcome
            assert result.text == greedy_text(tiny_model, PROMPTS[i], 4 + i) == result.outcome.text
            assert handles[i].duplicate_chunks == 0
        assert client.assignment == expected  # finishing requests changes nothing
        assert client._consumer.assignment() == expected  # what the consumer itself holds
        assert idle.assignment == frozenset()
        assert idle._consumer.assignment() == set()


async def test_assignment_grows_while_a_request_streams(shared, shared_client, tiny_model) -> None:
    """B, on partitions new to the client, is submitted while A has 4 of its 30 tokens and
    more to come (the gate holds the engine there); A's text is still complete and in order."""
    client, prefix, gate = shared_client, shared.prefix, shared.gate
    a = "grow-a"
    b = _first_id("grow-b", lambda rid: not (_outputs(prefix, rid) & _outputs(prefix, a)))
    gate.hold_at(4)
    handle_a = await client.submit(PROMPTS[0], request_id=a, max_tokens=30, ignore_eos=True)
    updates, collector = _collect(handle_a)
    await until(lambda: _text_tokens(updates) >= 4, what="A streams its first 4 tokens")
    assert not handle_a.done and client.assignment == _outputs(prefix, a)

    handle_b = await client.submit(PROMPTS[1], request_id=b, max_tokens=6)
    assert client.assignment == _outputs(prefix, a) | _outputs(prefix, b)
    gate.release()

    result_a, result_b = await handle_a.result(180), await handle_b.result(180)
    await collector
    assert result_a.text == greedy_text(tiny_model, PROMPTS[0], 30, ignore_eos=True)
    assert len(result_a.token_ids) == 30
    assert "".join(u.text for u in updates if u.kind is UpdateKind.TEXT) == result_a.text
    assert not any(u.kind is UpdateKind.RESTART for u in updates)
    assert result_b.text == greedy_text(tiny_model, PROMPTS[1], 6)
    assert handle_a.duplicate_chunks == handle_b.duplicate_chunks == 0


async def test_growing_keeps_records_not_read_yet(kafka_settings, prefix) -> None:
    """aiokafka's assign() forgets positions: grow_assignment puts them back. Nothing reads in
    between here, so records of the first partition wait unread while the second is added."""
    topic = protocol.tokens_topic(prefix)
    first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = AIOKafkaConsumer(**kafka_settings.client_kwargs(), group_id=None)
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs(), enable_idempotence=False)
    await consumer.start()
    await producer.start()
    try:
        await grow_assignment(consumer, await consumer.end_offsets([first]))
        for i in range(10):
            await producer.send_and_wait(topic, b"first %d" % i, partition=0)
        await grow_assignment(consumer, await consumer.end_offsets([second]))
        await grow_assignment(consumer, {first: 1_000})  # an assigned one never moves forward
        for i in range(5):
            await producer.send_and_wait(topic, b"second %d" % i, partition=1)
        got: dict[int, list[bytes]] = {0: [], 1: []}

        async def read() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=100)).items():
                got[tp.partition] += [r.value for r in records]
            return len(got[0]) >= 10 and len(got[1]) >= 5

        deadline = asyncio.get_running_loop().time() + 60  # catches a hang only
        while not await read():
            assert asyncio.get_running_loop().time() < deadline, f"records lost: {got}"
        assert got == {0: [b"first %d" % i for i in range(10)],
                       1: [b"second %d" % i for i in range(5)]}
        assert consumer.assignment() == {first, second}
    finally:
        await consumer.stop()
        await producer.stop()


async def test_follow_reads_a_request_produced_elsewhere(shared, shared_client) -> None:
    client, prefix = shared_client, shared.prefix
    handle = await client.follow("followed-1")
    assert client.assignment == _outputs(prefix, "followed-1")
    assert await client.follow("followed-1") is handle
    # Keyed by something else: its outputs are still keyed by its id (protocol rule 4).
    await client.produce_raw(b'{"id": "followed-1", "prompt": "hi", "max_tokens": 3}',
                             key=b"another key")
    result = await handle.result(120)
    assert result.outcome.type is EventType.COMPLETED and len(result.token_ids) == 3
    assert client.assignment == _outputs(prefix, "followed-1")


# -- a topic whose partition count grows
#
# The embedded broker cannot add partitions (no CreatePartitions), so the topics are made with 3
# partitions and the client is shown 2 at first: to it, the topic grows from 2 to 3 when the view
# is lifted. A plain producer stands in for a worker whose metadata already has 3 (it writes each
# output keyed by id with the default partitioner).


async def _write_outputs(producer: AIOKafkaProducer, prefix: str, rid: str, text: list[str],
                         complete: bool = True, start: bool = True) -> None:
    attempt = f"{rid}-attempt"
    key = rid.encode()
    if start:
        started = Event(request_id=rid, type=EventType.STARTED, attempt=attempt, worker="fake",
                        ts=protocol.now_ms())
        await producer.send_and_wait(protocol.events_topic(prefix), protocol.encode(started),
                                     key=key)
        for i, piece in enumerate(text):
            chunk = TokenChunk(request_id=rid, attempt=attempt, index=i, token_ids=[i], text=piece)
            meta = await producer.send_and_wait(protocol.tokens_topic(prefix),
                                                protocol.encode(chunk), key=key)
            assert meta.partition == partition_of(rid, 3)
    if complete:
        done = Event(request_id=rid, type=EventType.COMPLETED, attempt=attempt, worker="fake",
                     ts=protocol.now_ms(), text="".join(text), finish_reason="length",
                     usage=Usage(prompt_tokens=1, completion_tokens=len(text)))
        await producer.send_and_wait(protocol.events_topic(prefix), protocol.encode(done), key=key)


async def test_a_grown_topic_is_followed_without_losing_or_repeating(
    kafka_settings, monkeypatch
) -> None:
    prefix = await _make_prefix(kafka_settings, 3, 3)
    def on(two: int, three: int) -> Callable[[str], bool]:
        return lambda rid: (partition_of(rid, 2), partition_of(rid, 3)) == (two, three)

    s = _first_id("s", on(0, 1))  # moves to 1, which the client reads only from t on
    t = _first_id("t", on(1, 1))  # stays on 1
    u = _first_id("u", on(0, 2))  # moves to 2, which the client never read
    outputs = {protocol.tokens_topic(prefix), protocol.events_topic(prefix)}
    shown: dict[str, int | None] = {"count": 2}

    client = StreamerClient(kafka_settings, prefix)
    real = client._partition_count

    def partition_count(topic: str) -> int | None:
        return shown["count"] or real(topic) if topic in outputs else real(topic)

    monkeypatch.setattr(client, "_partition_count", partition_count)
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs(), enable_idempotence=False)
    await producer.start()
    try:
        async with client:
            hs = await client.submit("s", request_id=s)
            hu = await client.submit("u", request_id=u)
            # The "worker" already partitions by 3: s's and u's outputs go where the client
            # does not read (partition 1 is not assigned yet, 2 never was).
            await _write_outputs(producer, prefix, s, ["S0", "S1", "S2"])
            await _write_outputs(producer, prefix, u, ["U0", "U1"])
            ht = await client.submit("t", request_id=t)  # partition 1 is read from here on
            await _write_outputs(producer, prefix, t, ["T0", "T1"], complete=False)
            t_updates, t_collector = _collect(ht)
            await until(lambda: len(ht.events) == 1 and _text_tokens(t_updates) == 2,
                        what="t's started event and both chunks, read before the topic grows")
            assert client.assignment == {TopicPartition(topic, p) for topic in outputs
                                         for p in (0, 1)}
            assert not hs.done and not hu.done

            shown["count"] = None  # the topic "grew" to 3
            await client.refresh_partitions()
            await _write_outputs(producer, prefix, t, ["T0", "T1"], start=False)
            results = {rid: await handle.result(60) for rid, handle in
                       ((s, hs), (u, hu), (t, ht))}
            await t_collector
            assert client.assignment == {TopicPartition(topic, p) for topic in outputs
                                         for p in (0, 1, 2)}
    finally:
        await producer.stop()
    assert results[s].text == "S0S1S2" and results[u].text == "U0U1"
    assert results[t].text == "T0T1"
    for handle in (hs, hu, ht):
        # Partition 1 was read again from before s: t's records there came back once more and
        # were dropped by offset, not handed to its handle twice.
        assert handle.duplicate_chunks == 0
        assert [e.type for e in handle.events] == [EventType.STARTED, EventType.COMPLETED]
