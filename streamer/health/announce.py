"""The worker's announcement on `<prefix>.workers`: which model it serves and whether it is ready.

A compacted topic keyed by worker name, so its latest status is all a reader needs (the gateway
reads it for `/v1/models` and to answer 503 when no worker is ready). Sent every `interval_s`
and at once when readiness changes; a clean stop writes a tombstone. A worker that dies simply
stops announcing: readers drop a status older than their time-to-live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from streamer import protocol
from streamer.aio import cancel_and_wait

log = structlog.get_logger(__name__)

Send = Callable[[str, bytes | None, bytes], Awaitable["asyncio.Future[Any]"]]
"""(topic, value or None for a tombstone, key) -> a future the broker's ack resolves."""

CHECK_S = 0.5  # how soon a change of readiness is noticed


class Announcer:
    def __init__(self, send: Send, prefix: str, worker: str, model: str,
                 ready: Callable[[], bool], interval_s: float) -> None:
        self._send = send
        self.topic = protocol.workers_topic(prefix)
        self.worker = worker
        self.model = model
        self._ready = ready
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._pending: asyncio.Future[Any] | None = None
        self.sent = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="announcer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop announcing and write the tombstone (bounded: the broker may be gone)."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            ack = await self._send(self.topic, None, self.worker.encode())
            await asyncio.wait_for(ack, timeout)

    def status(self) -> protocol.WorkerStatus:
        return protocol.WorkerStatus(worker=self.worker, model=self.model, ready=self._ready(),
                                     ts=protocol.now_ms(),
                                     interval_ms=int(self.interval_s * 1000))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_ready: bool | None = None
        last_sent = float("-inf")
        while True:
            status = self.status()
            due = loop.time() - last_sent >= self.interval_s or status.ready != last_ready
            # One announcement in flight at most: during an outage they are not piled up.
            if due and (self._pending is None or self._pending.done()):
                try:
                    self._pending = await self._send(self.topic, protocol.encode(status),
                                                     self.worker.encode())
                    last_ready, last_sent = status.ready, loop.time()
                    self.sent += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never fatal: the next round tries again
                    log.debug("announce_failed", error=repr(exc)[:200])
            await asyncio.sleep(CHECK_S)
