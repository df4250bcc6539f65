"""`streamer top`: exposition parsing, percentile arithmetic, the frame, and a live run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from rich.console import Console

from streamer.broker import free_port
from streamer.config import KafkaSettings
from streamer.observability.metrics import WorkerMetrics, render
from streamer.observability.scrape import (
    WorkerScrape,
    bucket_delta,
    counter_delta,
    histogram_quantile,
    metrics_url,
    parse_metrics,
    readyz_url,
    scrape,
    sum_buckets,
)
from streamer.top import (
    DEFAULT_TARGET,
    BacklogReader,
    build_snapshot,
    consumer_group,
    render_frame,
    resolve_targets,
)

ROOT = Path(__file__).resolve().parent.parent
INF = float("inf")


def busy_worker(name: str = "w7") -> WorkerMetrics:
    m = WorkerMetrics(model="tiny", worker=name, version="9.9", process_metrics=False)
    m.set_ready(True)
    m.num_requests_running.set(3)
    m.num_requests_waiting.labels(priority="low").set(5)
    m.num_requests_waiting.labels(priority="high").set(1)
    m.generation_tokens.inc(100)
    m.kv_cache_usage.set(0.25)
    m.stage_busy_seconds.labels(stage="0").inc(2.0)
    m.stage_busy_seconds.labels(stage="1").inc(6.0)
    for _ in range(4):
        m.requests.labels(priority="high", outcome="completed").inc()
    m.requests.labels(priority="low", outcome="failed").inc()
    m.requests.labels(priority="low", outcome="rejected").inc(2)
    # 2 in (0.025, 0.05], 1 in (0.05, 0.075], 1 in (0.075, 0.1]
    for seconds in (0.04, 0.04, 0.06, 0.09):
        m.time_to_first_token.labels(priority="high").observe(seconds)
    m.time_to_first_token.labels(priority="low").observe(3.0)
    return m


def scrape_of(
    m: WorkerMetrics, target: str = "http://w7:9400/metrics", at: float = 0.0
) -> WorkerScrape:
    return parse_metrics(render(m).decode(), target, at)


def row_cells(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def frame_text(snap) -> str:  # type: ignore[no-untyped-def]
    console = Console(record=True, width=160, color_system=None)
    console.print(render_frame(snap))
    return console.export_text()


# ------------------------------------------------------------------------------ parsing


def test_parse_a_real_exposition() -> None:
    s = scrape_of(busy_worker())
    assert s.ok and s.error == ""
    assert (s.worker, s.model, s.version) == ("w7", "tiny", "9.9")
    assert s.running == 3
    assert s.waiting == {"urgent": 0, "high": 1, "normal": 0, "low": 5}
    assert s.generation_tokens == 100
    assert s.kv_usage == 0.25
    assert s.ready_gauge == 1 and s.ready is None and s.is_ready
    assert s.stage_busy == {"0": 2.0, "1": 6.0}
    assert s.requests[("high", "completed")] == 4
    assert s.requests[("low", "failed")] == 1
    assert s.requests[("low", "rejected")] == 2
    assert s.requests[("urgent", "completed")] == 0
    high = dict(s.ttft["high"])
    assert high[0.05] == 2 and high[0.075] == 3 and high[0.1] == 4 and high[INF] == 4
    assert s.ttft["high"][-1] == (INF, 4)
    assert [b for b, _ in s.ttft["high"]] == sorted(b for b, _ in s.ttft["high"])
    assert s.ttft["urgent"][-1] == (INF, 0)


def test_not_ready_worker() -> None:
    m = WorkerMetrics(worker="cold", process_metrics=False)
    s = scrape_of(m)
    assert s.ready_gauge == 0 and not s.is_ready
    s.ready = True  # /readyz wins over the gauge when it answered
    assert s.is_ready


def test_urls() -> None:
    assert metrics_url("127.0.0.1:9400") == "http://127.0.0.1:9400/metrics"
    assert metrics_url("http://h:1") == "http://h:1/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("http://h:1/metrics") == "http://h:1/metrics"
    assert readyz_url("http://h:1/metrics") == "http://h:1/readyz"


# -------------------------------------------------------------------------- arithmetic


def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = ((0.1, 10.0), (0.2, 20.0), (INF, 20.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.198)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.2)
    # Empty leading buckets are skipped: everything is in (0.1, 0.2].
    assert histogram_quantile(0.5, ((0.1, 0.0), (0.2, 4.0), (INF, 4.0))) == pytest.approx(0.15)
    # In the +Inf bucket: the largest finite bound, as PromQL reports it.
    assert histogram_quantile(0.99, ((0.1, 0.0), (0.2, 1.0), (INF, 5.0))) == 0.2
    assert histogram_quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None
    assert histogram_quantile(0.5, ()) is None


def test_bucket_and_counter_deltas() -> None:
    before = ((0.1, 1.0), (0.2, 3.0), (INF, 3.0))
    after = ((0.1, 1.0), (0.2, 5.0), (INF, 6.0))
    assert bucket_delta(before, after) == ((0.1, 0.0), (0.2, 2.0), (INF, 3.0))
    assert bucket_delta(None, after) == after
    restarted = ((0.1, 0.0), (0.2, 1.0), (INF, 1.0))
    assert bucket_delta(after, restarted) == restarted
    assert sum_buckets([before, after]) == ((0.1, 2.0), (0.2, 8.0), (INF, 9.0))
    assert counter_delta(10, 15) == 5
    assert counter_delta(10, 4) == 4  # restart
    assert counter_delta(None, 4) == 4


# ----------------------------------------------------------------------------- snapshot


def test_snapshot_rates_and_window_percentiles() -> None:
    m = busy_worker()
    first = scrape_of(m, at=100.0)
    m.generation_tokens.inc(50)
    m.stage_busy_seconds.labels(stage="0").inc(0.5)
    m.stage_busy_seconds.labels(stage="1").inc(1.0)
    for _ in range(10):
        m.time_to_first_token.labels(priority="urgent").observe(0.3)  # in (0.2, 0.3]
    second = scrape_of(m, at=102.0)
    down = WorkerScrape(target="http://gone:9401/metrics", error="Connection refused")

    snap = build_snapshot([second, down], {first.target: first},
                          {"urgent": 0, "high": 2, "normal": 0, "low": 7},
                          prefix="demo", group="demo-streamer-workers", taken_at=0)
    assert snap.tokens_per_s == pytest.approx(25.0)
    assert snap.window_s == pytest.approx(2.0)
    assert snap.ready == 1 and len(snap.workers) == 2
    assert snap.running == 3 and snap.waiting == 6
    assert (snap.completed, snap.failed, snap.rejected) == (4, 1, 2)
    assert snap.backlog == 9
    # Only the window's 10 urgent first tokens count: all in (0.2, 0.3].
    assert snap.ttft_live
    assert 0.2 < snap.ttft_p50 <= 0.3 and 0.2 < snap.ttft_p99 <= 0.3  # type: ignore[operator]
    lanes = {lane.name: lane for lane in snap.lanes}
    assert [lane.name for lane in snap.lanes] == ["urgent", "high", "normal", "low"]
    assert lanes["urgent"].ttft_p50 == pytest.approx(0.25)
    # No new first tokens in "high" this window: fall back to everything since start.
    assert lanes["high"].ttft_p50 == pytest.approx(0.05)
    assert lanes["low"].backlog == 7 and lanes["low"].waiting == 5
    worker, gone = snap.workers
    assert worker.name == "w7" and worker.status == "ready"
    assert worker.kv_usage == 0.25
    assert worker.stage_busy_live
    assert worker.stage_busy == [("0", pytest.approx(0.25)), ("1", pytest.approx(0.5))]
    assert gone.status == "unreachable" and gone.error == "Connection refused"


def test_first_snapshot_has_no_rates_but_cumulative_percentiles() -> None:
    snap = build_snapshot([scrape_of(busy_worker())], None, None, "cannot reach Kafka")
    assert snap.tokens_per_s is None
    assert not snap.ttft_live
    # 5 observations: 4 high (<= 0.1 s) and 1 low (3 s); the median is in (0.05, 0.075].
    assert 0.05 < snap.ttft_p50 <= 0.075  # type: ignore[operator]
    assert snap.backlog is None and snap.backlog_error == "cannot reach Kafka"
    assert snap.workers[0].stage_busy == [("0", 0.25), ("1", 0.75)]
    assert not snap.workers[0].stage_busy_live


# ----------------------------------------------------------------------------- rendering


def test_frame_names_lanes_workers_and_numbers() -> None:
    m = busy_worker()
    first = scrape_of(m, at=10.0)
    m.generation_tokens.inc(123)
    second = scrape_of(m, at=11.0)
    down = WorkerScrape(target="http://10.0.0.9:9401/metrics", error="timed out")
    snap = build_snapshot([second, down], {first.target: first},
                          {"urgent": 0, "high": 2, "normal": 11, "low": 7}, prefix="demo",
                          group="demo-streamer-workers")
    text = frame_text(snap)
    for word in ("urgent", "high", "normal", "low", "w7", "ready", "unreachable",
                 "10.0.0.9:9401: timed out", "prefix demo", "group demo-streamer-workers"):
        assert word in text, word
    assert "1/2 ready" in text
    assert "tokens/s 123.0" in text
    assert "completed 4" in text and "failed 1" in text and "rejected 2" in text
    assert "backlog 20" in text
    assert "25%" in text  # KV usage
    assert "s0 25% s1 75% of busy time" in text  # idle this window: shares of all busy time
    # lane, backlog, waiting, TTFT p50, TTFT p99, completed, failed, rejected
    assert row_cells(text, "high") == ["high", "2", "1", "50 ms", "99 ms", "4", "0", "0"]
    assert row_cells(text, "low") == ["low", "7", "5", "3.75 s", "4.97 s", "0", "1", "2"]


def test_frame_without_kafka_or_workers() -> None:
    snap = build_snapshot([WorkerScrape(target=DEFAULT_TARGET, error="Connection refused")],
                          None, None, "cannot reach Kafka at 127.0.0.1:1")
    text = frame_text(snap)
    assert "backlog unavailable" in text
    assert "cannot reach Kafka at 127.0.0.1:1" in text
    assert "0/1 ready" in text and "unreachable" in text
    text = frame_text(build_snapshot([], None, {}, None))
    assert "(no targets)" in text


# ----------------------------------------------------------------- targets, group, I/O


def test_targets_from_flag_fleet_file_or_default(tmp_path: Path) -> None:
    state = tmp_path / "fleet.json"
    assert resolve_targets(None, state) == [DEFAULT_TARGET]
    state.write_text(json.dumps({"workers": [
        {"index": 0, "pid": 1, "metrics": "http://127.0.0.1:9400/metrics"},
        {"index": 1, "pid": 2, "metrics": "http://127.0.0.1:9401/metrics"}]}))
    assert resolve_targets(None, state) == ["http://127.0.0.1:9400/metrics",
                                            "http://127.0.0.1:9401/metrics"]
    assert resolve_targets("a:1, http://b:2/metrics", state) == ["http://a:1/metrics",
                                                                 "http://b:2/metrics"]
    state.write_text("not json")
    assert resolve_targets(None, state) == [DEFAULT_TARGET]


def test_consumer_group_mirrors_worker_config() -> None:
    from streamer.config import EngineConfig, WorkerConfig

    for prefix in ("llm", "demo"):
        config = WorkerConfig(engine=EngineConfig(model="m"), prefix=prefix)
        assert consumer_group(prefix) == config.consumer_group
    assert consumer_group("demo", "mine") == "mine"


class CountingSettings(KafkaSettings):
    """Kafka settings that count how often a client is built from them (each Kafka attempt)."""

    attempts: ClassVar[list[int]]

    def client_kwargs(self) -> dict[str, Any]:
        self.attempts.append(1)
        return super().client_kwargs()


async def test_unreachable_worker_and_kafka_do_not_raise() -> None:
    result = await scrape(f"127.0.0.1:{free_port()}", http_timeout_s=1.0)
    assert not result.ok and result.error
    CountingSettings.attempts = []
    unreachable = CountingSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    # retry_s is far longer than any run of this test: the second read is within it.
    reader = BacklogReader(unreachable, "llm", "streamer-workers", timeout_s=3.0, retry_s=3600)
    backlog, error = await reader.read()
    assert backlog is None and error
    assert len(CountingSettings.attempts) == 1
    assert await reader.read() == (None, error)  # within retry_s: the same answer
    assert len(CountingSettings.attempts) == 1  # ... without asking Kafka again
    await reader.close()
    retrying = BacklogReader(unreachable, "llm", "streamer-workers", timeout_s=3.0, retry_s=0)
    assert (await retrying.read())[0] is None and (await retrying.read())[0] is None
    assert len(CountingSettings.attempts) == 3  # no retry window: each read tries again
    await retrying.close()


def test_once_without_anything_running_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "top", "--once", "--interval", "0",
         "--targets", f"127.0.0.1:{free_port()}",
         "--bootstrap-servers", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    assert "unreachable" in out.stdout and "backlog unavailable" in out.stdout
    assert out.stderr == ""


# --------------------------------------------------------------------------------- live


@pytest.mark.kafka
async def test_backlog_counts_records_nobody_consumed(client, kafka_settings, prefix) -> None:
    for _ in range(3):
        await client.submit("nobody is serving this lane", priority="low", max_tokens=1)
    reader = BacklogReader(kafka_settings, prefix, consumer_group(prefix))
    try:
        backlog, error = await reader.read()
    finally:
        await reader.close()
    assert error is None
    assert backlog == {"urgent": 0, "high": 0, "normal": 0, "low": 3}


@pytest.mark.kafka
async def test_top_once_against_a_live_worker(
    start_worker, client, prefix, kafka_bootstrap
) -> None:
    worker = await asyncio.to_thread(start_worker)
    handles = [await client.submit(f"hello {i}", priority=p, max_tokens=4)
               for i, p in enumerate(("high", "high", "normal"))]
    for handle in handles:
        result = await handle.result(60)
        assert result.outcome.type.value == "completed"
    port = worker.metrics_port
    assert port
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "streamer.cli", "top", "--once", "--interval", "0.5",
         "--targets", f"http://127.0.0.1:{port}/metrics", "--prefix", prefix,
         "--bootstrap-servers", kafka_bootstrap],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    print(text)  # shown when the test fails
    assert worker.name in text  # the worker id from streamer_info
    assert "1/1 ready" in text
    assert "completed 3" in text
    assert "backlog unavailable" not in text, text
    assert f"group {prefix}-streamer-workers" in text
    assert row_cells(text, "high")[5] == "2"  # completed in the high lane
    assert row_cells(text, "normal")[5] == "1"
    # top read the group's offsets without joining the group: no rebalance on the worker.
    assert worker.log().count("partitions_assigned") == 1, worker.log()[-3000:]
