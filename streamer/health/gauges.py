"""Engine gauges and per-step metrics (what /metrics says the engine is doing)."""

from __future__ import annotations

from typing import Any

from streamer import protocol
from streamer.engine.engine import Engine
from streamer.engine.kv.block_manager import KVCacheStats
from streamer.observability.metrics import WorkerMetrics


class EngineGauges:
    def __init__(self, engine: Engine, metrics: WorkerMetrics, stages: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self._busy_reported = [0.0] * stages
        # Prefix-cache token totals already added to the counters: the block manager keeps
        # lifetime totals, Prometheus counters take increments.
        self._prefix_reported = [0, 0, 0, 0]

    def on_step(self, plan: Any, seconds: float) -> None:
        self.metrics.batch_size.observe(len(plan.items))
        for i, total in enumerate(self.engine.stage_busy_seconds()):
            delta = total - self._busy_reported[i]
            if delta > 0:
                self.metrics.stage_busy_seconds.labels(stage=str(i)).inc(delta)
                self._busy_reported[i] = total

    def refresh(self) -> None:
        scheduler = self.engine.scheduler
        if scheduler is None:
            return
        self.metrics.num_requests_running.set(scheduler.num_running)
        for lane, priority in enumerate(protocol.PRIORITIES):
            self.metrics.num_requests_waiting.labels(priority).set(scheduler.num_waiting_in(lane))
        self.metrics.kv_cache_usage.set(self.engine.kv_usage)
        if self.engine.blocks is not None:
            self._refresh_kv(self.engine.blocks.stats)

    def _refresh_kv(self, stats: KVCacheStats) -> None:
        """Block states, and the prefix-cache counters brought up to the block manager's totals."""
        m = self.metrics
        m.kv_cache_blocks.labels(state="used").set(stats.used_blocks)
        m.kv_cache_blocks.labels(state="cached").set(stats.cached_free_blocks)
        m.kv_cache_blocks.labels(state="empty").set(stats.free_blocks - stats.cached_free_blocks)
        totals = (
            stats.query_tokens,
            stats.hit_tokens,
            stats.preempted_query_tokens,
            stats.preempted_hit_tokens,
        )
        counters = (
            m.prefix_cache_queries,
            m.prefix_cache_hits,
            m.prefix_cache_preempted_queries,
            m.prefix_cache_preempted_hits,
        )
        for i, (total, counter) in enumerate(zip(totals, counters, strict=True)):
            if total > self._prefix_reported[i]:
                counter.inc(total - self._prefix_reported[i])
                self._prefix_reported[i] = total
        m.prefix_cache_hit_ratio.set(stats.hit_rate)
