"""Which record is which: positions, and identities that survive a broker that resets offsets."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord

RecordKey = tuple[str, int, int]
"""(topic, partition, offset): where a record sits."""


@dataclass(frozen=True)
class RecordId:
    """A record's position plus what it holds. The embedded broker loses its log on restart and
    numbers new records from 0 again, so a position alone can name two different records."""

    key: RecordKey
    timestamp: int
    digest: bytes

    @classmethod
    def of(cls, record: ConsumerRecord[Any, Any]) -> RecordId:
        digest = hashlib.blake2b(record.value or b"", digest_size=8).digest()
        return cls((record.topic, record.partition, record.offset), record.timestamp, digest)


class RecentlyFinished:
    """Records finished recently (bounded, oldest forgotten first): a redelivered copy of one is
    marked finished again instead of being served twice."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[RecordKey, RecordId] = OrderedDict()

    def add(self, rid: RecordId) -> None:
        self._ids[rid.key] = rid
        self._ids.move_to_end(rid.key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, rid: RecordId) -> bool:
        return self._ids.get(rid.key) == rid

    def __len__(self) -> int:
        return len(self._ids)


def header(record: ConsumerRecord[Any, Any], name: str) -> bytes | None:
    return next((v for k, v in record.headers or () if k == name), None)
