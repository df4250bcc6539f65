"""Readiness, liveness and the stall watchdog, refreshed once a second.

Live (/healthz): the engine has not failed, no stage is stalled with work queued, the control
listener is running. Ready (/readyz): also the model is loaded, partitions are assigned, the
broker answers and the worker is not stopping. An outage is logged as a few summary lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from streamer.aio import cancel_and_wait
from streamer.engine.engine import Engine
from streamer.observability.metrics import WorkerMetrics

log = structlog.get_logger(__name__)

OUTAGE_LOG_EVERY_S = 30.0


class Outage:
    """When to log a broker outage (pure; `now` injected): its start, every 30 s, its end."""

    def __init__(self, every_s: float = OUTAGE_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.since: float | None = None
        self._last_log = float("-inf")

    def observe(self, ok: bool, now: float) -> str | None:
        """'down' or 'up' when a line is due, else None."""
        if ok:
            if self.since is None:
                return None
            self.since = None
            return "up"
        if self.since is None:
            self.since = now
        if now - self._last_log >= self.every_s:
            self._last_log = now
            return "down"
        return None


class Health:
    def __init__(
        self,
        engine: Engine,
        metrics: WorkerMetrics,
        *,
        probe: Callable[[float], object],
        assigned: Callable[[], bool],
        control_alive: Callable[[], bool],
        on_tick: Callable[[], None],
        stall_timeout_s: float,
        devices: tuple[str, ...],
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._probe = probe
        self._assigned = assigned
        self._control_alive = control_alive
        self._on_tick = on_tick
        self.stall_timeout_s = stall_timeout_s
        self.devices = devices
        self.broker_ok = True
        self.stopping = False
        self.stall: str | None = None
        self.outage = Outage()
        self._task: asyncio.Task[None] | None = None

    def healthy(self) -> tuple[bool, str]:
        if self.engine.fatal is not None:
            return False, f"engine failed: {self.engine.fatal!r}"
        if self.stall is not None:
            return False, self.stall
        if self.engine.scheduler is not None and not self._control_alive():
            return False, "the control listener (cancels) is not running"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.engine.scheduler is None:
            return False, "model not loaded"
        if self.engine.warming:
            return False, "warming up"
        if not self._assigned():
            return False, "not a member of the consumer group (no partitions assigned)"
        if not self.broker_ok:
            return False, "broker unreachable"
        if self.stopping:
            return False, "stopping"
        return True, "ok"

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="health-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failing check must not end the checks
                log.exception("health_check_failed")

    async def _tick(self) -> None:
        ok = bool(await self._probe(3.0))  # type: ignore[misc]
        now = time.monotonic()
        line = self.outage.observe(ok, now)
        if line == "up":
            log.warning("broker_reachable_again")
        elif line == "down":
            since = self.outage.since or now
            log.error("broker_unreachable", outage_s=round(now - since, 1))
        self.broker_ok = ok
        self.check_stall(now)
        self.metrics.set_ready(self.ready()[0])
        self._on_tick()
        self.metrics.refresh_device_stats(self.devices)

    def check_stall(self, now: float) -> None:
        scheduler = self.engine.scheduler
        idle_for = now - self.engine.last_step_at
        stalled = bool(scheduler and scheduler.has_work and idle_for > self.stall_timeout_s)
        if stalled and self.stall is None:
            self.stall = f"no engine step for {idle_for:.0f}s with work queued"
            log.error(
                "engine_stalled",
                idle_s=round(idle_for, 1),
                running=scheduler.num_running if scheduler else 0,
                waiting=scheduler.num_waiting if scheduler else 0,
                stages=self.engine.stage_activity(),
            )
            self.metrics.errors.labels(kind="stall").inc()
        elif not stalled and self.stall is not None:
            log.warning("engine_stall_cleared")
            self.stall = None
