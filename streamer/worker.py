"""The worker: the composition root of the data path.

    intake (consume, validate, prepare) -> engine -> egress (chunks, events, outcomes) -> commits

It builds each part, starts them in order and stops them in reverse; it owns nothing else.
Shutdown: stop fetching, let in-flight work finish within the grace period (a second signal cuts
it short), hand back the rest, flush outputs, commit, leave the group. Every step after the grace
period is bounded by `shutdown_timeout_s`, so a worker exits even when the broker is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable
from typing import Any

import structlog
from aiokafka.errors import KafkaError

from streamer import protocol
from streamer.cache.serving import ResultCache
from streamer.commits.committer import Committer
from streamer.commits.offsets import OffsetTracker
from streamer.config import WorkerConfig
from streamer.egress.outcomes import Outcomes, ProgressPolicy
from streamer.egress.publisher import Publisher
from streamer.engine.engine import Engine
from streamer.health.announce import Announcer
from streamer.health.gauges import EngineGauges
from streamer.health.monitor import Health
from streamer.intake.control import ControlListener
from streamer.intake.fetch import TRANSIENT
from streamer.intake.intake import Intake
from streamer.intake.progress import ProgressStore
from streamer.observability.http import MetricsServer
from streamer.observability.metrics import WorkerMetrics, render
from streamer.topics import TopicsError, apply_topics, missing_topics, worker_topics

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        self.name = config.name if config.worker_id else f"{socket.gethostname()}-{os.getpid()}"
        self.log = log.bind(worker=self.name)
        self.metrics = WorkerMetrics(model=config.engine.model, worker=self.name)
        engine = config.engine
        if engine.model_process is None:  # a worker's event loop does Kafka I/O: see remote.py
            engine = dataclasses.replace(engine, model_process=True)
        self.engine = Engine(engine)
        self.offsets = OffsetTracker()
        self.publisher = Publisher(config.kafka, config.prefix, self.name,
                                   on_record=self._count_output)
        self.outcomes = Outcomes(
            self.publisher, self.metrics, self.name, lambda rid, f: self.intake.finished(rid, f),
            chunk_s=config.chunk_ms / 1000, chunk_tokens=config.chunk_tokens,
            chunk_records_per_s=config.chunk_records_per_s,
            seed_of=self.engine.seed_of,
        )
        self.metrics.chunk_window.set_function(self.outcomes.budget.window)
        self.progress: ProgressStore | None = None
        self.control = ControlListener(
            config.kafka, config.prefix, config.cancel_window_s, self._on_cancel
        )
        self.intake = Intake(
            config, self.name, self.engine, self.outcomes, self.offsets, self.control
        )
        self.cache = ResultCache(config.cache, config.engine, self.metrics) \
            if config.cache.enabled else None
        self.committer = Committer(lambda: self.intake.consumer, self.offsets, self.metrics,
                                   interval_s=config.commit_interval_s)
        self.intake.before_revoke = self.committer.commit
        self.gauges = EngineGauges(self.engine, self.metrics, len(config.engine.devices))
        self.health = Health(
            self.engine, self.metrics,
            probe=self.publisher.probe,
            assigned=lambda: self.intake.assigned,
            control_alive=lambda: self.control.alive and (
                self.progress is None or self.progress.alive),
            on_tick=self.committer.refresh_lag,
            stall_timeout_s=config.stall_timeout_s,
            devices=config.engine.devices,
        )
        self.intake.on_assignment = lambda: self.metrics.set_ready(self.health.ready()[0])
        self.server = MetricsServer(
            lambda: render(self.metrics), healthy=self.health.healthy, ready=self.health.ready,
            port=config.metrics_port,
        )
        self.announcer = Announcer(
            lambda topic, value, key: self.publisher.send(topic, value, key, []),
            config.prefix, self.name, config.served_model_name,
            ready=lambda: self.health.ready()[0], interval_s=config.announce_interval_s,
        )
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()

    def request_stop(self) -> None:
        """First call: drain within the grace period. A second call cuts the grace short."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()
        self.health.stopping = True

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        cfg = self.config
        # Every log line of this worker (and of the tasks it starts) names it.
        structlog.contextvars.bind_contextvars(worker=self.name)
        try:
            await self.server.start()
            self.log.info("metrics_listening", port=self.server.port)
            self.metrics.set_info(version=_version(), model=cfg.engine.model, worker=self.name)
            await self._topics()
            await self.engine.start()
            self.engine.on_step = self.gauges.on_step
            self.metrics.watch_model_process(self.engine.model_pid)
            if self.cache is not None:
                await self.cache.start()
                self.intake.cache = self.cache
            await self.publisher.start()
            if cfg.engine.warmup:  # the first request must not wait for output-topic metadata
                for topic in (protocol.tokens_topic(cfg.prefix), protocol.events_topic(cfg.prefix)):
                    await self.publisher.partitions_of(topic)  # metadata only: nothing produced
            await self._start_progress()
            await self.control.start()
            await self.intake.start()
            await self.committer.start()
            await self.health.start()
            await self.announcer.start()
            self.log.info("worker_started", group=cfg.consumer_group,
                          topics=list(self.intake.lanes))
            await self._intake_loop()
        finally:
            await self._shutdown()

    async def _topics(self) -> None:
        """Create missing topics (development), or check that they exist and fail if not: a
        production worker must never create a topic (nor let a metadata request do it)."""
        cfg = self.config
        if cfg.apply_topics:
            for line in (await apply_topics(cfg.kafka, cfg.prefix)).lines():
                self.log.info("topic", state=line)
            return
        missing = await missing_topics(cfg.kafka, worker_topics(cfg.prefix))
        if missing:
            self.log.error("topics_missing", topics=missing)
            raise TopicsError(
                f"topics missing: {', '.join(missing)}. This worker does not create topics "
                f"(--no-apply-topics): run `streamer topics apply --prefix {cfg.prefix}` first")

    async def _intake_loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            if self.engine.fatal is not None:
                raise RuntimeError("engine failed") from self.engine.fatal
            try:
                await self.intake.poll()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (*TRANSIENT, KafkaError) as exc:  # the broker is away: try again shortly
                self.log.debug("fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            self.gauges.refresh()

    async def _shutdown(self) -> None:
        cfg, timeout = self.config, self.config.shutdown_timeout_s
        self.health.stopping = True
        self.metrics.set_ready(False)
        await _bounded("announcer", self.announcer.stop(timeout), timeout + 1)
        flights = self.intake.flights.all()
        self.log.info("worker_stopping", inflight=len(flights))
        await self._drain([f.task for f in flights if f.task is not None], cfg.shutdown_grace_s)
        for flight in self.intake.flights.all():
            self.engine.abort(flight.request.id, "revoked")  # uncommitted: the next owner redoes it
        if self.outcomes.tasks:
            await asyncio.wait(list(self.outcomes.tasks), timeout=timeout)
        await _bounded("flush", self.publisher.flush(), timeout)
        await _bounded("final_commit", self.committer.commit(), timeout)
        for name, stop in (
            ("health", self.health.stop),
            ("committer", self.committer.stop),
            ("control", self.control.stop),
            ("progress", self._stop_progress),
            ("consumer", lambda: self.intake.stop(timeout)),
            ("publisher", lambda: self.publisher.stop(timeout)),
            ("cache", self._stop_cache),
            ("engine", self.engine.stop),
            ("metrics_server", self.server.stop),
        ):
            await _bounded(name, stop(), timeout + 1)
        self.log.info("worker_stopped")

    async def _drain(self, tasks: list[asyncio.Task[None]], grace_s: float) -> None:
        """Wait for `tasks` until they end, the grace period passes, or a second stop signal."""
        hurry = asyncio.ensure_future(self._hurry.wait())
        deadline = time.monotonic() + grace_s
        pending = set(tasks)
        try:
            while pending and not self._hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                done, _ = await asyncio.wait([*pending, hurry], timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                pending -= done
        finally:
            hurry.cancel()

    async def _start_progress(self) -> None:
        """Attempts record progress and resume from it, when the progress topic exists."""
        cfg = self.config
        if not cfg.resume:
            return
        topic = protocol.progress_topic(cfg.prefix)
        partitions = await self.publisher.partitions_of(topic)
        if not partitions:
            self.log.warning("resume_disabled", reason=f"topic {topic} not found "
                             "(create it with `streamer topics apply`)")
            return
        self.outcomes.progress = ProgressPolicy(partitions, cfg.progress_tokens, cfg.progress_s)
        self.progress = ProgressStore(cfg.kafka, cfg.prefix, partitions)
        await self.progress.start()
        self.intake.progress = self.progress

    async def _stop_cache(self) -> None:
        if self.cache is not None:
            await self.cache.stop()

    async def _stop_progress(self) -> None:
        if self.progress is not None:
            await self.progress.stop()

    # ------------------------------------------------------------------ wiring

    def _count_output(self, kind: str, size: int) -> None:
        self.metrics.output_records.labels(kind=kind).inc()
        self.metrics.output_bytes.labels(kind=kind).inc(size)
        self.intake.output_sent()

    def _on_cancel(self, request_id: str) -> None:
        if self.engine.abort(request_id, "cancelled"):
            self.log.info("request_cancelled", request_id=request_id)

    def ready(self) -> tuple[bool, str]:
        return self.health.ready()

    def healthy(self) -> tuple[bool, str]:
        return self.health.healthy()


async def _bounded(name: str, step: Awaitable[Any], timeout: float) -> None:
    """One shutdown step: never raises, never waits past `timeout`."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        log.warning("shutdown_step_timed_out", step=name, timeout_s=timeout)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled: pass it on
        # aiokafka's stop() can leak the cancellation of its own background tasks.
        log.warning("shutdown_step_cancelled", step=name)
    except Exception as exc:
        log.warning("shutdown_step_failed", step=name, error=repr(exc)[:200],
                    after_s=round(time.monotonic() - began, 1))


def _version() -> str:
    import streamer

    return streamer.__version__

