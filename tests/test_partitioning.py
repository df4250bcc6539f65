"""Kafka's default partitioner, written anew, against aiokafka's; the read log's bookkeeping."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from streamer.partitioning import ReadLog, murmur2, partition_for

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz0123456789-_",
    "äöüßéèçñøåæœ",  # two UTF-8 bytes each
    "日本語のリクエスト識別子",  # three bytes each
    "🙂🚀🧪",  # four bytes each
]


def _random_ids(n: int, seed: int = 14) -> list[str]:
    rng = random.Random(seed)
    ids = []
    for i in range(n):
        length = rng.choice([1, 2, 3, 4, 5, 7, 8, 13, 16, 32, 36, 64, 128])
        alphabet = "".join(rng.sample(ALPHABETS, rng.randint(1, len(ALPHABETS))))
        ids.append(f"{i}" + "".join(rng.choice(alphabet) for _ in range(length)))
    return ids


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 8, 12, 64, 1000])
def test_partition_for_equals_aiokafka_default_partitioner(partitions: int) -> None:
    every = list(range(partitions))
    ids = _random_ids(10_000)
    assert any(not i.isascii() for i in ids) and len({len(i.encode()) % 4 for i in ids}) == 4
    for request_id in ids:
        key = request_id.encode()
        assert partition_for(key, partitions) == DefaultPartitioner()(key, every, every), request_id


def test_murmur2_equals_aiokafka_and_kafkas_own_vectors() -> None:
    rng = random.Random(7)
    for length in range(0, 70):
        data = bytes(rng.randrange(256) for _ in range(length))
        assert murmur2(data) == aiokafka_murmur2(data)
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2 (Java ints, so signed).
    vectors = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536,
               "a-little-bit-longer-string": -1486304829, "abc": 479470107,
               "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    for text, signed in vectors.items():
        assert murmur2(text.encode()) == signed & 0xFFFFFFFF, text


def test_partition_for_needs_a_partition() -> None:
    with pytest.raises(ValueError, match="num_partitions=0"):
        partition_for(b"id", 0)


def test_read_log_hands_out_each_offset_once() -> None:
    log = ReadLog()
    tp = ("llm.tokens", 3)
    log.seek(tp, 10)
    assert [log.first_time(tp, o) for o in (10, 11, 12, 15)] == [True] * 4  # 13, 14 absent
    assert log.spans(tp) == [(10, 16)]
    # Sought back to 8: 8 and 9 are new, 10..15 were handed out, 16 on are new.
    log.seek(tp, 8)
    assert [log.first_time(tp, o) for o in (8, 9, 10, 12, 15, 16, 17)] == [
        True, True, False, False, False, True, True]
    assert log.spans(tp) == [(8, 18)]
    # Another partition is its own.
    assert log.first_time(("llm.tokens", 4), 10)


def test_read_log_seeks_into_the_middle_and_before_a_gap() -> None:
    log = ReadLog()
    tp = ("t", 0)
    log.seek(tp, 100)
    for o in range(100, 110):
        assert log.first_time(tp, o)
    log.seek(tp, 50)  # read 50..54, then sought back again before reaching 100
    assert all(log.first_time(tp, o) for o in range(50, 55))
    assert log.spans(tp) == [(50, 55), (100, 110)]
    log.seek(tp, 40)
    got = [o for o in range(40, 112) if log.first_time(tp, o)]
    assert got == [*range(40, 50), *range(55, 100), 110, 111]
    assert log.spans(tp) == [(40, 112)]


def test_read_log_without_a_seek_starts_at_the_first_record() -> None:
    log = ReadLog()
    assert log.first_time("p", 7)
    assert not log.first_time("p", 7)  # the same record again
    assert log.spans("p") == [(7, 8)]
