"""The three cache levels, each a small get/put over bytes.

* L1 `MemoryLevel`: this process, least recently used out past a byte bound (pure, sync).
* L2 `RedisLevel`: a Redis server the fleet shares, through redis-py's asyncio client, every call
  bounded by a short timeout; entries expire after a TTL (`SET ... EX`).
* L3 `DiskLevel`: a diskcache directory (SQLite plus files) bounded in bytes with LRU eviction and
  a TTL per entry; its calls are synchronous, so they run in a thread.

A level that fails raises; the tiered facade (`tiered.py`) turns that into a counted miss.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any


class MemoryLevel:
    """Bytes by key, least recently used evicted first once `max_bytes` would be passed."""

    name = "l1"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return  # larger than the whole level: never held
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        while self._items and self.bytes + len(value) > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= len(evicted)
            self.evictions += 1
        self._items[key] = value
        self.bytes += len(value)

    def __len__(self) -> int:
        return len(self._items)


class RedisLevel:
    """L2 on a Redis server; `timeout_s` bounds connecting and every command."""

    name = "l2"

    def __init__(self, url: str, ttl_s: float, timeout_s: float, prefix: str = "streamer:r:"):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # no retries: a slow cache is a miss, not a wait
        )

    async def get(self, key: str) -> bytes | None:
        value = await asyncio.wait_for(self._client.get(self.prefix + key), self.timeout_s)
        return bytes(value) if value is not None else None

    async def put(self, key: str, value: bytes) -> None:
        await asyncio.wait_for(self._client.set(self.prefix + key, value, px=self.ttl_ms),
                               self.timeout_s)

    async def close(self) -> None:
        await self._client.aclose()


class DiskLevel:
    """L3 in a diskcache directory: bounded by `max_bytes` (least recently used out), entries
    expire `ttl_s` after they were written. Several processes may share one directory."""

    name = "l3"

    def __init__(self, path: str, max_bytes: int, ttl_s: float) -> None:
        import diskcache

        self.ttl_s = ttl_s
        self._cache = diskcache.Cache(
            path, size_limit=max_bytes, eviction_policy="least-recently-used",
            timeout=1.0,  # SQLite busy timeout: another worker writing the same directory
        )

    async def get(self, key: str) -> bytes | None:
        value = await asyncio.to_thread(self._cache.get, key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        await asyncio.to_thread(self._cache.set, key, value, expire=self.ttl_s)

    def close(self) -> None:
        self._cache.close()
