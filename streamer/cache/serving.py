"""The result cache as the worker uses it: a lookup when a request is admitted, a fill when its
attempt completes.

Intake asks `lookup` for every prepared request that does not resume an earlier attempt. The
answer is None (not cacheable: opted out with `"cache": false`, or sampled without a seed), or a
`Cached`: on a hit its `stream()` replays the entry instead of the engine, and the outcome path
publishes it as usual (queued, started, the stored chunks, completed with `timings.cache`), with
the usual acknowledgement and commit rules; on a miss it records the chunks the engine's attempt
publishes, and its `completed()` stores them once the `completed` event is acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from streamer.cache import entry as entries
from streamer.cache.key import cache_key, cacheable, model_identity
from streamer.cache.levels import DiskLevel, MemoryLevel, RedisLevel
from streamer.cache.tiered import CacheCounters, Level, TieredCache
from streamer.config import CacheConfig, EngineConfig
from streamer.engine.outputs import RequestStream
from streamer.engine.sequence import SamplingParams
from streamer.protocol import Event, EventType, GenerationRequest

log = structlog.get_logger(__name__)


class Cached:
    """One admitted cacheable request: a hit to replay (`level` set) or a miss to record."""

    def __init__(self, key: str, level: str | None, entry: entries.Entry | None,
                 store: Callable[[str, bytes], None]) -> None:
        self.key = key
        self.level = level
        """Where the hit came from (l1, l2, l3); None: a miss, served by the engine."""
        self.entry = entry
        self._store = store
        self._recorder = entries.Recorder()

    def stream(self, request_id: str) -> RequestStream:
        assert self.entry is not None, "a miss has nothing to replay"
        return entries.ReplayStream(request_id, self.entry)

    def chunk(self, token_ids: list[int], text: str) -> None:
        """A token chunk of this attempt was sent (in order)."""
        if self.level is None:
            self._recorder.chunk(token_ids, text)

    def completed(self, event: Event) -> None:
        """The attempt's outcome was acknowledged: a miss that completed fills every level."""
        if self.level is not None or event.type is not EventType.COMPLETED:
            return
        assert event.usage is not None and event.finish_reason is not None
        entry = self._recorder.entry(
            finish_reason=str(event.finish_reason), text=event.text or "",
            prompt_tokens=event.usage.prompt_tokens,
            completion_tokens=event.usage.completion_tokens,
        )
        if entry is not None:
            self._store(self.key, entries.encode(entry))


class ResultCache:
    def __init__(self, config: CacheConfig, engine: EngineConfig,
                 metrics: CacheCounters | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.identity: str | None = None
        self.tiers: TieredCache | None = None

    async def start(self) -> None:
        from streamer.engine.model import resolve_dtype

        cfg, eng = self.config, self.engine
        dtype = str(resolve_dtype(eng.dtype, eng.devices)).removeprefix("torch.")
        self.identity = await asyncio.to_thread(model_identity, eng.model, dtype, eng.devices)
        levels: list[Level] = [MemoryLevel(cfg.l1_bytes)]
        if cfg.redis_url:
            levels.append(RedisLevel(cfg.redis_url, cfg.l2_ttl_s, cfg.redis_timeout_s))
        if cfg.l3_path:
            levels.append(DiskLevel(cfg.l3_path, cfg.l3_bytes, cfg.l3_ttl_s))
        self.tiers = TieredCache(levels, self.metrics)
        log.info("result_cache_ready", levels=self.tiers.names, model_identity=self.identity,
                 l1_bytes=cfg.l1_bytes, l3_path=cfg.l3_path)

    async def stop(self) -> None:
        tiers, self.tiers = self.tiers, None
        if tiers is not None:
            await tiers.stop()

    async def lookup(self, request: GenerationRequest, prompt_ids: list[int],
                     params: SamplingParams) -> Cached | None:
        """None when the request must not be cached, else its hit or miss."""
        if self.tiers is None or self.identity is None or not request.cache:
            return None
        if not cacheable(params):
            return None
        key = cache_key(self.identity, prompt_ids, params)
        found = await self.tiers.get(key)
        if found is not None:
            level, data = found
            entry = entries.decode(data)
            if entry is not None:
                return Cached(key, level, entry, self.tiers.put)
            log.warning("cache_entry_unreadable", level=level)
        return Cached(key, None, None, self.tiers.put)
