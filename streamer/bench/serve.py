"""Load generator against a running fleet, through Kafka, timed from the client's side.

Requests go out with `StreamerClient.submit` at the workload's send times (at most
`max_concurrency` in flight); each request's token chunks and outcome are timed as they are
consumed from `<prefix>.tokens` and `<prefix>.events`. A chunk whose attempt is superseded (a
worker died and another restarted the request) is dropped with the attempt, like the client
drops it, so TTFT and ITL describe the text the user finally got.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamer.bench.stats import Aggregate, RequestTiming, aggregate, per_lane, run_window
from streamer.bench.workload import BenchRequest, Workload
from streamer.client import StreamerClient, UpdateKind
from streamer.config import KafkaSettings
from streamer.protocol import EventType


@dataclass
class ServeResult:
    """Client-side timings of one load run, and what they add up to."""

    timings: list[RequestTiming]
    duration_s: float
    slo: dict[str, float]
    overall: Aggregate
    lanes: dict[str, Aggregate]
    failures: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"duration_s": self.duration_s,
                "slo_ms": {k: v * 1000 for k, v in self.slo.items()},
                "overall": self.overall.to_json(),
                "lanes": {lane: agg.to_json() for lane, agg in self.lanes.items()},
                "failures": self.failures}


def summarize_run(timings: list[RequestTiming], slo: Mapping[str, float]) -> ServeResult:
    duration = run_window(timings)
    failures: dict[str, int] = {}
    for t in timings:
        if not t.ok:
            failures[t.outcome or "no outcome"] = failures.get(t.outcome or "no outcome", 0) + 1
    return ServeResult(timings, duration, dict(slo), aggregate(timings, duration, slo),
                       per_lane(timings, duration, slo), failures)


async def run_load(kafka: KafkaSettings, prefix: str, workload: Workload, *,
                   slo: Mapping[str, float], max_concurrency: int | None = None,
                   timeout_s: float = 600.0,
                   on_done: Callable[[RequestTiming], None] | None = None) -> ServeResult:
    """Send the workload through Kafka and time every request until its outcome.

    A request without an outcome within `timeout_s` of the run's start counts as failed
    ("timeout") rather than hanging the benchmark.
    """
    limit = asyncio.Semaphore(max_concurrency or len(workload.requests) or 1)
    run_tag = uuid.uuid4().hex[:8]  # ids unique per run: runs may share a fleet and its topics
    async with StreamerClient(kafka, prefix) as client:
        began = time.monotonic()
        deadline = began + timeout_s

        async def one(request: BenchRequest) -> RequestTiming:
            delay = began + request.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit:
                timing = await _request(client, request, f"{request.request_id}-{run_tag}",
                                        deadline)
            if on_done is not None:
                on_done(timing)
            return timing

        timings = await asyncio.gather(*(one(r) for r in workload.requests))
    return summarize_run(list(timings), slo)


async def _request(client: StreamerClient, request: BenchRequest, request_id: str,
                   deadline: float) -> RequestTiming:
    timing = RequestTiming(request.request_id, request.lane, time.monotonic(), request.max_tokens)
    handle = await client.submit(request.prompt, request_id=request_id,
                                 priority=request.lane, max_tokens=request.max_tokens,
                                 ignore_eos=True, temperature=0.0)
    arrivals: list[float] = []

    async def follow() -> None:
        async for update in handle.updates():
            if update.kind is UpdateKind.TEXT:
                arrivals.append(time.monotonic())
            elif update.kind is UpdateKind.RESTART:
                arrivals.clear()  # a new attempt: the user's text starts over

    try:
        await asyncio.wait_for(follow(), max(0.0, deadline - time.monotonic()))
        result = await handle.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        timing.outcome = "timeout"
        return timing
    timing.finished = time.monotonic()
    outcome = result.outcome
    timing.outcome = str(outcome.type)
    timing.ok = outcome.type is EventType.COMPLETED
    tokens = outcome.usage.completion_tokens if outcome.usage else len(result.token_ids)
    timing.chunks = _spread(arrivals, tokens)
    return timing


def _spread(arrivals: list[float], tokens: int) -> list[tuple[float, int]]:
    """(arrival, tokens) per chunk. A client update does not say how many tokens its chunk held;
    with one token per chunk (no coalescing) that is exact, otherwise the surplus is put on the
    last chunk, which keeps the token total exact (TPOT) and the chunk times exact (TTFT, ITL)."""
    if not arrivals:
        return []
    counts = [1] * len(arrivals)
    counts[-1] += max(0, tokens - len(arrivals))
    return list(zip(arrivals, counts, strict=True))


# ------------------------------------------------------------------------- progress bar


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, description: str = "requests") -> Any:
    """A rich progress bar of finished requests; yields the per-request callback."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                  transient=False) as progress:
        task = progress.add_task(description, total=total, status="")
        failed = 0

        def done(timing: RequestTiming) -> None:
            nonlocal failed
            failed += not timing.ok
            progress.update(task, advance=1, status=f"failed {failed}" if failed else "")

        yield done
