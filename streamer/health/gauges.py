"""Engine gauges and per-step metrics (what /metrics says the engine is doing)."""

from __future__ import annotations

from typing import Any

from streamer import protocol
from streamer.engine.engine import Engine
from streamer.observability.metrics import WorkerMetrics


class EngineGauges:
    def __init__(self, engine: Engine, metrics: WorkerMetrics, stages: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self._busy_reported = [0.0] * stages

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
