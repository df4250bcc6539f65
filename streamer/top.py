"""`streamer top`: a live terminal view of the fleet.

Three separate parts, so each can be tested alone:

- gathering: :func:`streamer.observability.scrape.scrape_all` reads every worker's ``/metrics`` and
  ``/readyz``; :class:`BacklogReader` reads each lane's backlog from Kafka (end offsets minus the
  worker group's committed offsets) without joining the group;
- :func:`build_snapshot` (pure) turns two rounds of scrapes plus the backlog into a
  :class:`Snapshot`: rates, percentiles, totals;
- :func:`render_frame` (pure) turns a :class:`Snapshot` into a rich renderable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from streamer.config import DEFAULT_GROUP, consumer_group
from streamer.observability.scrape import (
    Buckets,
    WorkerScrape,
    bucket_delta,
    counter_delta,
    histogram_quantile,
    metrics_url,
    previous_by_target,
    scrape_all,
    sum_buckets,
)
from streamer.protocol import PRIORITIES, request_topic

DEFAULT_TARGET = "http://127.0.0.1:9400/metrics"
FLEET_STATE_FILE = Path(".streamer/fleet.json")


# ------------------------------------------------------------------------------ the snapshot


@dataclass
class LaneRow:
    name: str
    backlog: int | None = None
    """Records in Kafka not yet committed by the group (includes those held by workers)."""
    waiting: float = 0.0
    """Consumed by a worker, waiting for admission."""
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    completed: float = 0.0
    failed: float = 0.0
    rejected: float = 0.0


@dataclass
class WorkerRow:
    target: str
    name: str = ""
    status: str = "unreachable"
    """ready, not ready, or unreachable."""
    error: str = ""
    model: str = ""
    running: float = 0.0
    waiting: float = 0.0
    tokens_per_s: float | None = None
    kv_usage: float | None = None
    stage_busy: list[tuple[str, float]] = field(default_factory=list)
    """(stage, fraction): busy fraction over the window, or share of all busy time when idle."""
    stage_busy_live: bool = False
    """True: fractions of the last window; False: shares of the cumulative busy time."""


@dataclass
class Snapshot:
    workers: list[WorkerRow]
    lanes: list[LaneRow]
    tokens_per_s: float | None = None
    running: float = 0.0
    waiting: float = 0.0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    ttft_live: bool = False
    """True: percentiles of the last window's first tokens; False: since the workers started."""
    completed: float = 0.0
    failed: float = 0.0
    rejected: float = 0.0
    backlog_error: str | None = None
    """Why there is no backlog (Kafka unreachable...); None when the backlog was read."""
    window_s: float | None = None
    prefix: str = "llm"
    group: str = DEFAULT_GROUP
    taken_at: float = 0.0
    """Wall-clock time of the snapshot."""

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers if w.status == "ready")

    @property
    def backlog(self) -> int | None:
        if self.backlog_error is not None:
            return None
        return sum(lane.backlog or 0 for lane in self.lanes)


def build_snapshot(
    current: Sequence[WorkerScrape],
    previous: Mapping[str, WorkerScrape] | None = None,
    backlog: Mapping[str, int] | None = None,
    backlog_error: str | None = None,
    *,
    prefix: str = "llm",
    group: str = DEFAULT_GROUP,
    taken_at: float | None = None,
) -> Snapshot:
    """Combine this round's scrapes with the last round's (for rates) and the lane backlog.

    Rates (tokens/s, stage busy) need the same worker in both rounds; TTFT percentiles use the
    buckets that filled between the rounds when any did, else everything since the workers
    started (so an idle fleet still shows its history).
    """
    previous = previous or {}
    ok = [s for s in current if s.ok]
    lanes_seen = list(PRIORITIES) + sorted(
        {lane for s in ok for lane in (*s.waiting, *s.ttft)} - set(PRIORITIES) - {""})

    workers: list[WorkerRow] = []
    rates: list[float] = []
    windows: list[float] = []
    for s in current:
        if not s.ok:
            workers.append(WorkerRow(target=s.target, status="unreachable", error=s.error))
            continue
        row = WorkerRow(target=s.target, name=s.worker, model=s.model,
                        status="ready" if s.is_ready else "not ready",
                        running=s.running, waiting=sum(s.waiting.values()), kv_usage=s.kv_usage)
        prev = previous.get(s.target)
        dt = s.at - prev.at if prev is not None else 0.0
        if prev is not None and dt > 0:
            windows.append(dt)
            row.tokens_per_s = counter_delta(prev.generation_tokens, s.generation_tokens) / dt
            rates.append(row.tokens_per_s)
            busy = {k: counter_delta(prev.stage_busy.get(k), v) / dt
                    for k, v in s.stage_busy.items()}
            if any(v > 0 for v in busy.values()):
                row.stage_busy = [(k, min(v, 1.0)) for k, v in _by_stage(busy)]
                row.stage_busy_live = True
        if not row.stage_busy_live:
            total = sum(s.stage_busy.values())
            if total > 0:
                row.stage_busy = [(k, v / total) for k, v in _by_stage(s.stage_busy)]
        workers.append(row)

    # TTFT per lane: the window's new observations (summed over workers) if there were any.
    window_ttft: dict[str, Buckets] = {}
    total_ttft: dict[str, Buckets] = {}
    for lane in lanes_seen:
        window_ttft[lane] = sum_buckets(
            bucket_delta(previous[s.target].ttft.get(lane) if s.target in previous else None,
                         s.ttft.get(lane, ()))
            for s in ok if s.target in previous)
        total_ttft[lane] = sum_buckets(s.ttft.get(lane, ()) for s in ok)

    lanes: list[LaneRow] = []
    for lane in lanes_seen:
        buckets = window_ttft[lane] if _count(window_ttft[lane]) > 0 else total_ttft[lane]
        lanes.append(LaneRow(
            name=lane,
            backlog=None if backlog is None else backlog.get(lane),
            waiting=sum(s.waiting.get(lane, 0.0) for s in ok),
            ttft_p50=histogram_quantile(0.5, buckets),
            ttft_p99=histogram_quantile(0.99, buckets),
            completed=_outcome(ok, lane, "completed"),
            failed=_outcome(ok, lane, "failed"),
            rejected=_outcome(ok, lane, "rejected"),
        ))

    fleet_window = sum_buckets(window_ttft.values())
    ttft_live = _count(fleet_window) > 0
    fleet_ttft = fleet_window if ttft_live else sum_buckets(total_ttft.values())
    if backlog is None and backlog_error is None:
        backlog_error = "backlog unavailable"
    return Snapshot(
        workers=workers,
        lanes=lanes,
        tokens_per_s=sum(rates) if rates else None,
        running=sum(s.running for s in ok),
        waiting=sum(lane.waiting for lane in lanes),
        ttft_p50=histogram_quantile(0.5, fleet_ttft),
        ttft_p99=histogram_quantile(0.99, fleet_ttft),
        ttft_live=ttft_live,
        completed=sum(lane.completed for lane in lanes),
        failed=sum(lane.failed for lane in lanes),
        rejected=sum(lane.rejected for lane in lanes),
        backlog_error=backlog_error,
        window_s=max(windows) if windows else None,
        prefix=prefix,
        group=group,
        taken_at=time.time() if taken_at is None else taken_at,
    )


def _count(buckets: Buckets) -> float:
    return buckets[-1][1] if buckets else 0.0


def _outcome(scrapes: Sequence[WorkerScrape], lane: str, outcome: str) -> float:
    return sum(s.requests.get((lane, outcome), 0.0) for s in scrapes)


def _by_stage(values: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda kv: (len(kv[0]), kv[0]))


# ------------------------------------------------------------------------------- rendering


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render_frame(snap: Snapshot) -> RenderableType:
    """The whole view: header panel, per-lane table, per-worker table."""
    total = len(snap.workers)
    ready_style = "green" if total and snap.ready == total else ("yellow" if snap.ready else "red")
    window = f"last {snap.window_s:.1f}s" if snap.ttft_live and snap.window_s else "since start"
    header = Text()
    header.append("workers ", style="bold")
    header.append(f"{snap.ready}/{total} ready", style=ready_style)
    header.append("   tokens/s ", style="bold").append(_rate(snap.tokens_per_s))
    header.append("   running ", style="bold").append(_n(snap.running))
    header.append("   waiting ", style="bold").append(_n(snap.waiting))
    if snap.backlog is None:
        header.append("   backlog unavailable", style="yellow")
    else:
        header.append("   backlog ", style="bold").append(_n(snap.backlog))
    header.append("\nTTFT ", style="bold")
    header.append(f"p50 {_ms(snap.ttft_p50)}  p99 {_ms(snap.ttft_p99)}")
    header.append(f" ({window})", style="dim")
    header.append("   completed ", style="bold").append(_n(snap.completed), style="green")
    header.append("   failed ", style="bold").append(
        _n(snap.failed), style="red" if snap.failed else "")
    header.append("   rejected ", style="bold").append(
        _n(snap.rejected), style="yellow" if snap.rejected else "")
    if snap.backlog_error is not None and snap.backlog_error != "backlog unavailable":
        header.append(f"\nbacklog unavailable: {snap.backlog_error}", style="yellow")
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    title = f"streamer top · prefix {snap.prefix} · group {snap.group} · {stamp}"

    lanes = Table(title="lanes", title_justify="left", expand=False,
                  caption="backlog: in Kafka, not committed yet · waiting: held by workers",
                  caption_justify="left")
    for name in ("lane", "backlog", "waiting", "TTFT p50", "TTFT p99",
                 "completed", "failed", "rejected"):
        lanes.add_column(name, justify="left" if name == "lane" else "right")
    for lane in snap.lanes:
        lanes.add_row(
            lane.name,
            "n/a" if snap.backlog_error is not None else _n(lane.backlog),
            _n(lane.waiting),
            _ms(lane.ttft_p50),
            _ms(lane.ttft_p99),
            _n(lane.completed),
            _n(lane.failed),
            _n(lane.rejected),
        )

    workers = Table(title="workers", title_justify="left", expand=False)
    for name in ("worker", "target", "status", "running", "waiting", "tokens/s", "KV",
                 "stage busy"):
        right = name in ("running", "waiting", "tokens/s", "KV")
        workers.add_column(name, justify="right" if right else "left",
                           no_wrap=name == "status", overflow="fold")
    for w in snap.workers:
        style = {"ready": "green", "not ready": "yellow"}.get(w.status, "red")
        status = Text(w.status, style=style)
        if w.status == "unreachable":
            workers.add_row(w.name or "?", _short(w.target), status, "-", "-", "-", "-", "-")
            continue
        workers.add_row(
            w.name or "?",
            _short(w.target),
            status,
            _n(w.running),
            _n(w.waiting),
            _rate(w.tokens_per_s),
            "-" if w.kv_usage is None else f"{w.kv_usage * 100:.0f}%",
            _stages(w),
        )
    if not snap.workers:
        workers.add_row("(no targets)", "", "", "", "", "", "", "")
    errors = [f"{_short(w.target)}: {w.error}" for w in snap.workers if w.error]
    if errors:
        workers.caption = "\n".join(errors)
        workers.caption_justify = "left"
        workers.caption_style = "dim red"

    return Group(Panel(header, title=title, title_align="left"), lanes, workers)


def _short(url: str) -> str:
    return url.removeprefix("http://").removesuffix("/metrics")


def _stages(w: WorkerRow) -> Text:
    if not w.stage_busy:
        return Text("-")
    if not w.stage_busy_live and len(w.stage_busy) == 1:
        return Text("idle", style="dim")
    text = Text(" ".join(f"s{k} {v * 100:.0f}%" for k, v in w.stage_busy))
    if not w.stage_busy_live:
        text.append(" of busy time", style="dim")
    return text


# ---------------------------------------------------------------------------------- Kafka


class BacklogReader:
    """Per-lane backlog: sum over partitions of (end offset - the group's committed offset).

    Uses a consumer with the workers' ``group_id`` that never subscribes, so it never joins the
    group or triggers a rebalance; it only asks the coordinator for committed offsets (the admin
    API's list-group-offsets is not implemented by the embedded broker). A partition the group
    never committed counts from its beginning offset, as the workers' ``auto_offset_reset``
    does. Any Kafka error leaves the consumer closed and is reported; the next read retries.
    """

    def __init__(self, kafka: Any, prefix: str, group: str, timeout_s: float = 5.0,
                 retry_s: float = 10.0) -> None:
        self.kafka = kafka
        self.prefix = prefix
        self.group = group
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._consumer: Any = None
        self._failed: tuple[float, str] | None = None

    async def read(self) -> tuple[dict[str, int] | None, str | None]:
        """(lane -> backlog, None), or (None, why it is unavailable). Never raises.

        After a failure, reads within ``retry_s`` repeat the error at once instead of waiting on
        Kafka again, so a black-holed broker does not slow every refresh by ``timeout_s``.
        """
        if self._failed is not None and time.monotonic() < self._failed[0]:
            return None, self._failed[1]
        try:
            result = await asyncio.wait_for(self._read(), self.timeout_s)
        except Exception as exc:  # unreachable, timed out, unknown topic...
            await self.close()
            error = _describe(exc, getattr(self.kafka, "bootstrap_servers", ""))
            self._failed = (time.monotonic() + self.retry_s, error)
            return None, error
        self._failed = None
        return result, None

    async def _read(self) -> dict[str, int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                **self.kafka.client_kwargs(), group_id=self.group, enable_auto_commit=False,
                client_id="streamer-top", request_timeout_ms=int(self.timeout_s * 1000))
            try:
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._consumer = consumer
        consumer = self._consumer
        cluster = await consumer._client.fetch_all_metadata()  # no public equivalent
        lanes: dict[str, list[Any]] = {}
        for lane in PRIORITIES:
            topic = request_topic(self.prefix, lane)
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                raise LookupError(f"topic {topic} not found")
            lanes[lane] = [TopicPartition(topic, p) for p in sorted(partitions)]
        tps = [tp for group in lanes.values() for tp in group]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        position = dict(zip(tps, committed, strict=True))
        result: dict[str, int] = {}
        for lane, group in lanes.items():
            result[lane] = sum(
                max(0, ends[tp] - (position[tp] if position[tp] is not None else begins[tp]))
                for tp in group)
        return result

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self.timeout_s)


def _describe(exc: BaseException, bootstrap: str = "") -> str:
    if isinstance(exc, TimeoutError):
        return "Kafka did not answer in time"
    if type(exc).__name__ == "KafkaConnectionError":
        return f"cannot reach Kafka at {bootstrap}" if bootstrap else "cannot reach Kafka"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


# ------------------------------------------------------------------------------ the command


def resolve_targets(targets: str | None, state_file: Path = FLEET_STATE_FILE) -> list[str]:
    """--targets, else the workers in ``streamer fleet``'s state file, else the default port."""
    if targets:
        return [metrics_url(t.strip()) for t in targets.split(",") if t.strip()]
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        state = json.loads(state_file.read_text())
        found = [metrics_url(w["metrics"]) for w in state["workers"] if w.get("metrics")]
        if found:
            return found
    return [DEFAULT_TARGET]




async def run_top(args: argparse.Namespace, console: Console | None = None) -> int:
    from streamer.config import KafkaSettings

    # aiokafka logs connection failures; the frame already says "backlog unavailable", and a
    # stray stderr line would tear the live view. A handler stops logging's last-resort printer.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    logging.getLogger("aiokafka").propagate = False
    console = console or Console()
    group = consumer_group(args.prefix, args.group)
    interval = max(0.0, float(args.interval))
    try:
        kafka = KafkaSettings.from_env(bootstrap_servers=args.bootstrap_servers)
        reader: BacklogReader | None = BacklogReader(kafka, args.prefix, group)
        kafka_error = None
    except ValueError as exc:
        reader, kafka_error = None, f"Kafka settings: {exc}"

    async def gather(previous: Mapping[str, WorkerScrape]) -> tuple[Snapshot, list[WorkerScrape]]:
        targets = resolve_targets(args.targets, Path(args.fleet_file))
        if reader is not None:
            scrapes, (backlog, error) = await asyncio.gather(
                scrape_all(targets, args.timeout), reader.read())
        else:
            scrapes, backlog, error = await scrape_all(targets, args.timeout), None, kafka_error
        snap = build_snapshot(scrapes, previous, backlog, error, prefix=args.prefix, group=group)
        return snap, scrapes

    try:
        if args.once:
            # Two scrapes `interval` apart, so the frame has rates (tokens/s, live TTFT).
            snap, first = await gather({})
            if interval > 0 and previous_by_target(first):
                await asyncio.sleep(interval)
                snap, _ = await gather(previous_by_target(first))
            console.print(render_frame(snap))
            return 0

        from rich.live import Live

        previous: Mapping[str, WorkerScrape] = {}
        with Live(console=console, auto_refresh=False, screen=args.screen,
                  redirect_stdout=False) as live:
            while True:
                began = time.monotonic()
                snap, scrapes = await gather(previous)
                previous = previous_by_target(scrapes)
                live.update(render_frame(snap), refresh=True)
                await asyncio.sleep(max(0.05, interval - (time.monotonic() - began)))
    finally:
        if reader is not None:
            await reader.close()


def cmd_top(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_top(args))
    except KeyboardInterrupt:
        return 0


def add_top_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="live terminal view of the fleet",
                       description="Live view of the fleet: workers' /metrics and /readyz, and "
                       "each lane's backlog in Kafka.")
    p.add_argument("--targets", help="comma-separated worker metrics URLs (default: the workers in "
                   f"{FLEET_STATE_FILE}, else {DEFAULT_TARGET})")
    p.add_argument("--fleet-file", default=str(FLEET_STATE_FILE),
                   help="state file written by `streamer fleet` (default %(default)s)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between refreshes (default 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="per-scrape HTTP timeout in seconds")
    p.add_argument("--once", action="store_true",
                   help="print one frame (two scrapes --interval apart, for rates) and exit")
    p.add_argument("--screen", action="store_true", help="use the terminal's alternate screen")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers "
                   "(default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    p.add_argument("--prefix", default=os.environ.get("STREAMER_PREFIX", "llm"),
                   help="topic prefix (default llm)")
    p.add_argument("--group", default=os.environ.get("STREAMER_GROUP_ID"),
                   help="workers' consumer group (default streamer-workers, or "
                   "<prefix>-streamer-workers for another prefix)")
    p.set_defaults(func=cmd_top)
