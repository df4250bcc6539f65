"""The levels as one cache: look up L1, then L2, then L3; fill the levels above a hit; a miss
fills every level.

A level that fails (Redis down or slow, a disk error) never fails a request: the lookup counts an
error for that level, logs it (the first failure, then at most one line every `LOG_EVERY_S` with
the count since), and goes on as a miss. After a failure the level is skipped for `RETRY_S`, so
an unreachable Redis costs a request at most one timeout, not one per request. Writes run in the
background (tracked, awaited at `stop`): the outcome is never held up by filling the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from streamer.aio import cancel_and_wait
from streamer.cache.levels import MemoryLevel

log = structlog.get_logger(__name__)

LOG_EVERY_S = 30.0
RETRY_S = 5.0


class Level(Protocol):
    name: str

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: bytes) -> Any: ...


class CacheCounters(Protocol):
    """What the facade reports (WorkerMetrics has these)."""

    cache_hits: Any
    cache_misses: Any
    cache_errors: Any
    cache_l1_bytes: Any


class _Failures:
    """Rate-limited logging and the retry pause of one level (clock injected)."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.skip_until = float("-inf")
        self.unlogged = 0
        self.last_log = float("-inf")

    def failed(self, what: str, error: BaseException, now: float) -> None:
        self.skip_until = now + RETRY_S
        self.unlogged += 1
        if now - self.last_log >= LOG_EVERY_S:
            log.warning("cache_level_failed", level=self.level, op=what, error=repr(error)[:200],
                        failures=self.unlogged, retry_in_s=RETRY_S)
            self.last_log, self.unlogged = now, 0

    def skipping(self, now: float) -> bool:
        return now < self.skip_until


class TieredCache:
    def __init__(self, levels: list[Level], metrics: CacheCounters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.levels = levels
        self.metrics = metrics
        self.clock = clock
        self._failures = {level.name: _Failures(level.name) for level in levels}
        self._writes: set[asyncio.Task[Any]] = set()

    @property
    def names(self) -> list[str]:
        return [level.name for level in self.levels]

    async def get(self, key: str) -> tuple[str, bytes] | None:
        """(level name, value) of the first level holding `key`, else None."""
        for i, level in enumerate(self.levels):
            value = await self._call(level, "get", lambda lv=level: lv.get(key))
            if value is not None:
                self._count("cache_hits", level.name)
                for upper in self.levels[:i]:
                    self._write(upper, key, value)
                return level.name, value
            self._count("cache_misses", level.name)
        return None

    def put(self, key: str, value: bytes) -> None:
        """Fill every level (L1 at once, the others in the background); `result_cached` is
        logged once every level has answered."""
        self._spawn(self._fill(key, value))

    async def _fill(self, key: str, value: bytes) -> None:
        levels = list(self.levels)
        writes = [t for level in levels if (t := self._write(level, key, value)) is not None]
        await asyncio.gather(*writes, return_exceptions=True)
        log.info("result_cached", key=key[:16], bytes=len(value), levels=[lv.name for lv in levels])

    async def flush(self) -> None:
        """Wait for the writes started so far (tests, and `stop`)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def stop(self, timeout: float = 5.0) -> None:
        """Let pending writes finish (bounded), then close every level; idempotent."""
        if self._writes:
            _, late = await asyncio.wait(list(self._writes), timeout=timeout)
            await cancel_and_wait(*late)
        for level in self.levels:
            close = getattr(level, "close", None)
            if close is not None:
                try:
                    result = close()
                    if isinstance(result, Awaitable):
                        await result
                except Exception as exc:
                    log.warning("cache_close_failed", level=level.name, error=repr(exc)[:200])
        self.levels = []

    # ------------------------------------------------------------------ internals

    async def _call(self, level: Level, what: str, call: Callable[[], Any]) -> Any:
        failures = self._failures[level.name]
        if failures.skipping(self.clock()):
            return None
        try:
            result = call()
            if isinstance(result, Awaitable):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down, a timeout, a disk error: a miss, never a failure
            failures.failed(what, exc, self.clock())
            self._count("cache_errors", level.name)
            return None
        if isinstance(level, MemoryLevel) and self.metrics is not None:
            self.metrics.cache_l1_bytes.set(level.bytes)
        return result

    def _write(self, level: Level, key: str, value: bytes) -> asyncio.Task[Any] | None:
        if isinstance(level, MemoryLevel):  # in memory: at once
            level.put(key, value)
            if self.metrics is not None:
                self.metrics.cache_l1_bytes.set(level.bytes)
            return None
        return self._spawn(self._call(level, "put", lambda: level.put(key, value)))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    def _count(self, counter: str, level: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, counter).labels(level=level).inc()
