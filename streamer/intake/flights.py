"""The requests a worker is serving, by id and by record (pure bookkeeping)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka.structs import ConsumerRecord

from streamer.engine.outputs import RequestStream
from streamer.intake.records import RecordId, RecordKey
from streamer.protocol import GenerationRequest, Resumed

if TYPE_CHECKING:
    from streamer.cache.serving import Cached


@dataclass(eq=False)
class Flight:
    """One attempt at one request: the record it came from and the engine stream it reads."""

    request: GenerationRequest
    record: ConsumerRecord[Any, Any]
    rid: RecordId
    priority: str
    stream: RequestStream
    prompt_tokens: int
    traceparent: bytes | None = None
    tokenize_s: float = 0.0
    resumed: Resumed | None = None
    """Set when this attempt continues an earlier one (its `started` event says so)."""
    resume_base: tuple[list[int], int] = ([], 0)
    """Resumed only: the earlier attempts' tokens and the characters of text they carried."""
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)
    task: asyncio.Task[None] | None = None
    trail: Any = None
    """Its progress records (egress.progress.ProgressTrail) while it is served, if resumable."""
    cache: Cached | None = None
    """A cacheable request: its hit (replayed, not generated) or the miss it records."""

    @property
    def key(self) -> RecordKey:
        return self.rid.key

    @property
    def partition(self) -> tuple[str, int]:
        return self.rid.key[0], self.rid.key[1]


class Flights:
    """In-flight requests. A flight is `current` while it is registered: one that was handed
    back (its partition moved) is not, so its late completion finishes nothing."""

    def __init__(self) -> None:
        self._by_id: dict[str, Flight] = {}
        self._by_record: dict[RecordKey, Flight] = {}

    def add(self, flight: Flight) -> None:
        self._by_id[flight.request.id] = flight
        self._by_record[flight.key] = flight

    def remove(self, flight: Flight) -> bool:
        if self._by_id.get(flight.request.id) is not flight:
            return False
        del self._by_id[flight.request.id]
        if self._by_record.get(flight.key) is flight:
            del self._by_record[flight.key]
        return True

    def is_current(self, flight: Flight) -> bool:
        return self._by_id.get(flight.request.id) is flight

    def by_id(self, request_id: str) -> Flight | None:
        return self._by_id.get(request_id)

    def by_record(self, rid: RecordId) -> Flight | None:
        flight = self._by_record.get(rid.key)
        return flight if flight is not None and flight.rid == rid else None

    def in_partitions(self, partitions: set[tuple[str, int]]) -> list[Flight]:
        return [f for f in self._by_id.values() if f.partition in partitions]

    def all(self) -> list[Flight]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id
