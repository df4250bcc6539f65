"""Progress records of one attempt: how far it got, so the next owner of the request continues.

A record names only tokens whose chunks the broker has acknowledged (it is produced after those
acks), so a reader of the earlier attempt's chunks always has every token the record claims. One
write is in flight at a time, which keeps a request's records in order on its partition. The
request's outcome is followed by a tombstone. The time rule has its own timer, so a request
that is held or paused still gets a record of its acknowledged tokens within `every_s`. A
hand-back (shutdown) and every rebalance write a record with everything acknowledged, so the
next owner regenerates (almost) nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from streamer import protocol
from streamer.egress.publisher import Publisher, PublisherStopped
from streamer.protocol import Progress, Resumed, Segment

log = structlog.get_logger(__name__)

HAND_BACK_ACK_WAIT_S = 2.0


class ProgressTrail:
    def __init__(
        self,
        publisher: Publisher,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        *,
        on_record: Callable[[], None] = lambda: None,
        request_id: str,
        attempt: str,
        record: tuple[str, int, int],
        partition: int,
        prompt_tokens: int,
        resumed: Resumed | None,
        base: tuple[list[int], int],
        seed: int | None,
        every_tokens: int,
        every_s: float,
    ) -> None:
        self.publisher = publisher
        self.spawn = spawn
        self.on_record = on_record
        self.request_id = request_id
        self.attempt = attempt
        self.record = record
        self.partition = partition
        self.prompt_tokens = prompt_tokens
        self.segments = list(resumed.segments) if resumed is not None else []
        self.start = resumed.index if resumed is not None else 0
        self.seed = seed
        self.every_tokens = every_tokens
        self.every_s = every_s
        self.tokens, self.chars = list(base[0]), base[1]
        self._chunks: list[tuple[int, int, asyncio.Future[Any]]] = []  # (end, chars, ack)
        self._written = self.start  # tokens covered by the last record written
        self._last_write = time.monotonic()
        self._writing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False  # handed back or finished: this attempt writes no more records
        self._checkpointing = False  # a checkpoint writes directly: no write starts meanwhile
        self.records = 0
        self._dirty = resumed is not None  # a progress entry of this request exists

    def chunk(self, token_ids: list[int], text: str, ack: asyncio.Future[Any]) -> None:
        """A chunk was handed to the publisher; write a record when one is due."""
        self.tokens.extend(token_ids)
        self.chars += len(text)
        self._chunks.append((len(self.tokens), self.chars, ack))
        self._consider()

    def _consider(self) -> None:
        """Start a write when a record is due; else, with tokens unrecorded, arm the timer of
        the time rule (one at a time)."""
        fresh = len(self.tokens) - self._written
        if self._closed or self._checkpointing or fresh <= 0 or self._writing is not None:
            return
        wait = self._last_write + self.every_s - time.monotonic()
        if fresh >= self.every_tokens or wait <= 0:
            self._writing = self.spawn(self._write(len(self._chunks)))
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._consider()

    def close(self) -> None:
        """The attempt ends here (outcome or hand-back): no record after this one's last, so a
        late timer never overwrites the next owner's progress."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _write(self, upto: int) -> None:
        """Once the first `upto` chunks are acknowledged, record them; then, in the same task,
        the record that came due meanwhile (no later chunk may come to trigger it: a request
        held or paused would otherwise keep a stale record)."""
        failed = False
        try:
            while True:
                chunks = self._chunks[:upto]
                results = await asyncio.gather(*(a for _, _, a in chunks), return_exceptions=True)
                if any(isinstance(r, BaseException) for r in results):
                    failed = True  # a chunk that never landed: what a reader has stops before it
                    return
                end, chars, _ = chunks[-1]
                if end > self._written:
                    await self._send(end, chars)
                if len(self.tokens) - self._written < self.every_tokens:
                    return
                upto = len(self._chunks)
        except PublisherStopped:
            failed = True
        finally:
            self._writing = None
            if not failed:
                self._consider()  # tokens newer than this record: the timer covers them

    async def _send(self, end: int, chars: int) -> None:
        topic, partition, offset = self.record
        own = [Segment(attempt=self.attempt, start=self.start, end=end)] if end > self.start else []
        progress = Progress(
            request_id=self.request_id, attempt=self.attempt, worker=self.publisher.worker,
            ts=protocol.now_ms(), topic=topic, partition=partition, offset=offset,
            prompt_tokens=self.prompt_tokens, token_ids=self.tokens[:end], text_chars=chars,
            segments=self.segments + own, seed=self.seed,
        )
        await (await self.publisher.send_progress(self.request_id, progress, self.partition))
        self._written, self._last_write, self._dirty = end, time.monotonic(), True
        self.records += 1
        self.on_record()

    async def settle(self) -> None:
        """Wait for the write in flight, if any."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)

    async def checkpoint(self) -> None:
        """Record every acknowledged token now: before the request leaves this worker (a
        hand-back), or before a rebalance may move it (the next owner reads progress only once
        it has the partition, so this record is there in time)."""
        self._checkpointing = True
        try:
            await self._checkpoint()
        finally:
            self._checkpointing = False
        self._consider()

    async def _checkpoint(self) -> None:
        await self.settle()
        pending = [a for _, _, a in self._chunks if not a.done()]
        if pending:  # the last chunks were flushed just now: give their acks a moment
            await asyncio.wait(pending, timeout=HAND_BACK_ACK_WAIT_S)
        acked = 0
        for i, (_, _, ack) in enumerate(self._chunks):
            if not ack.done() or ack.cancelled() or ack.exception() is not None:
                break
            acked = i + 1
        if acked and self._chunks[acked - 1][0] > self._written:
            end, chars, _ = self._chunks[acked - 1]
            try:
                await self._send(end, chars)
            except PublisherStopped:
                return
        log.debug("progress_checkpoint", request_id=self.request_id, tokens=self._written)

    async def clear(self) -> None:
        """The outcome is published: remove the request's entry (a tombstone)."""
        self.close()
        await self.settle()
        if not self._dirty:
            return
        with contextlib.suppress(PublisherStopped):
            await (await self.publisher.send_progress(self.request_id, None, self.partition))
