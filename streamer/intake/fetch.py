"""Fetching that a poisoned record cannot stop.

aiokafka decodes record headers while it iterates a fetched batch. A header key that is not valid
UTF-8 raises inside `getmany`, the records of that call are lost (their positions may already have
moved), and the bad record is fetched again on the next call: the partition never advances. So a
`Fetcher` remembers the next offset it handed out per partition; when `getmany` raises, it seeks
every partition back to that offset, finds the raising partition by reading one partition at a
time, and reports the record at its position as poisoned (the caller dead-letters a stub); then
it seeks past it. Redelivered records are harmless: the intake de-duplicates by record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord

log = structlog.get_logger(__name__)

# Errors that mean "the broker is away", not "this record is bad".
TRANSIENT = (KafkaConnectionError, asyncio.TimeoutError, ConnectionError)


@dataclass(frozen=True)
class Poisoned:
    """A record that the Kafka client itself could not decode."""

    topic: str
    partition: int
    offset: int
    error: str


class Fetcher:
    """`getmany` with positions remembered, so a record aiokafka cannot decode is skipped."""

    def __init__(self, consumer: AIOKafkaConsumer, max_records: int = 64) -> None:
        self.consumer = consumer
        self.max_records = max_records
        self._next: dict[TopicPartition, int] = {}

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Revoked partitions: their next owner starts from the committed offset."""
        for tp in partitions:
            self._next.pop(tp, None)

    def remember(self, tp: TopicPartition, offset: int) -> None:
        """Where a partition starts when no record was handed out yet (consumers without a
        group have no committed offset to fall back to)."""
        self._next[tp] = offset

    async def fetch(
        self, timeout_ms: int
    ) -> tuple[list[ConsumerRecord[Any, Any]], list[Poisoned]]:
        try:
            batches = await self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.max_records
            )
        except asyncio.CancelledError:
            raise
        except TRANSIENT:
            raise
        except Exception as exc:
            log.warning("fetch_failed_isolating_record", error=repr(exc)[:300])
            return await self._isolate(exc)
        return self._delivered(r for records in batches.values() for r in records), []

    def _delivered(
        self, records: Iterable[ConsumerRecord[Any, Any]]
    ) -> list[ConsumerRecord[Any, Any]]:
        out = list(records)
        for record in out:
            self._next[TopicPartition(record.topic, record.partition)] = record.offset + 1
        return out

    async def _rewind(self, partitions: Iterable[TopicPartition]) -> None:
        """Back to the next offset handed out (or the committed one): nothing is skipped."""
        for tp in partitions:
            offset = self._next.get(tp)
            if offset is None:
                committed = await self.consumer.committed(tp)
                if committed is None:
                    await self.consumer.seek_to_beginning(tp)
                    continue
                offset = committed
            self.consumer.seek(tp, offset)

    async def _isolate(
        self, first_error: Exception
    ) -> tuple[list[ConsumerRecord[Any, Any]], list[Poisoned]]:
        assigned = sorted(self.consumer.assignment())
        paused = self.consumer.paused()
        await self._rewind(assigned)
        records: list[ConsumerRecord[Any, Any]] = []
        poisoned: list[Poisoned] = []
        for tp in assigned:
            if tp in paused:
                continue
            # One record at a time: when the call raises, the bad record is at the position.
            for _ in range(self.max_records):
                try:
                    got = await self.consumer.getmany(tp, timeout_ms=200, max_records=1)
                except asyncio.CancelledError:
                    raise
                except TRANSIENT:
                    raise
                except Exception as exc:
                    await self._rewind([tp])
                    offset = await self.consumer.position(tp)
                    poisoned.append(Poisoned(tp.topic, tp.partition, offset, repr(exc)[:500]))
                    self.consumer.seek(tp, offset + 1)
                    self._next[tp] = offset + 1
                    break
                batch = got.get(tp, [])
                if not batch:
                    break
                records += self._delivered(batch)
        if not poisoned:
            # Nothing raised on a second look (e.g. the fetch had not come back): try again later.
            log.warning("fetch_error_not_reproduced", error=repr(first_error)[:300])
        return records, poisoned
