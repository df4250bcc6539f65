"""Where a keyed record lands, and which offsets a reader has already handed out. Pure code.

Workers produce every output keyed by the request id with the producer's default partitioner, so
a client that knows an id and a topic's partition count knows the one partition to read:

    partition = (murmur2(key) & 0x7FFFFFFF) % num_partitions

`murmur2` is the Java client's `org.apache.kafka.common.utils.Utils.murmur2` (MurmurHash2, seed
0x9747B28C, 32-bit little-endian blocks); aiokafka's `DefaultPartitioner` and librdkafka's
`murmur2_random` partitioner give the same partition for every non-null key.
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 of `data` as Kafka computes it, as an unsigned 32-bit integer."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    body = length - length % 4
    for (k,) in struct.iter_unpack("<I", data[:body]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[body:]
    # The Java switch falls through: three tail bytes mix all three, then one multiply.
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, num_partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a record keyed `key`."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions}; a topic has at least 1 partition")
    # Java's Utils.toPositive(murmur2(key)) % numPartitions: drop the sign bit, then reduce.
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


class ReadLog:
    """The offsets of each partition already handed out, so that reading a partition again after
    a seek backwards hands out no record twice.

    A partition is read in offset order from each seek, so every run from a seek to the last
    record read covers all the records between them; the log keeps those runs as sorted,
    disjoint half-open spans (usually one per partition). Keys are any hashable partition name,
    e.g. aiokafka's `TopicPartition`.
    """

    def __init__(self) -> None:
        self._spans: dict[object, list[tuple[int, int]]] = {}
        self._next: dict[object, int] = {}  # where the current run continues

    def seek(self, partition: object, offset: int) -> None:
        """The reader will next read `partition` from `offset`."""
        self._next[partition] = offset

    def first_time(self, partition: object, offset: int) -> bool:
        """Record that the reader got `offset`; False when it was handed out before."""
        spans = self._spans.setdefault(partition, [])
        seen = any(lo <= offset < hi for lo, hi in spans)
        start = self._next.get(partition, offset)
        self._add(spans, start if start <= offset else offset, offset + 1)
        self._next[partition] = offset + 1
        return not seen

    def spans(self, partition: object) -> list[tuple[int, int]]:
        return list(self._spans.get(partition, []))

    @staticmethod
    def _add(spans: list[tuple[int, int]], lo: int, hi: int) -> None:
        kept = []
        for a, b in spans:
            if b < lo or a > hi:
                kept.append((a, b))
            else:  # overlapping or adjacent: merge
                lo, hi = min(lo, a), max(hi, b)
        kept.append((lo, hi))
        spans[:] = sorted(kept)
