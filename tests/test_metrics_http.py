"""The worker's metrics registry and its /metrics, /healthz, /readyz server."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from conftest import until
from prometheus_client.parser import text_string_to_metric_families

from streamer.engine.kv.block_manager import BlockManager
from streamer.health.gauges import EngineGauges
from streamer.observability.http import MetricsServer
from streamer.observability.metrics import (
    EXPORTED_METRIC_NAMES,
    KV_BLOCK_STATES,
    OUTCOMES,
    PRIORITIES,
    WorkerMetrics,
    render,
)

#: The documented names, as Prometheus sees them (counters with _total, histograms with _bucket).
DOCUMENTED = {
    "streamer_time_to_first_token_seconds_bucket",
    "streamer_time_per_output_token_seconds_bucket",
    "streamer_e2e_request_latency_seconds_bucket",
    "streamer_request_queue_time_seconds_bucket",
    "streamer_batch_size_bucket",
    "streamer_requests_total",
    "streamer_generation_tokens_total",
    "streamer_prompt_tokens_total",
    "streamer_num_preemptions_total",
    "streamer_errors_total",
    "streamer_stage_busy_seconds_total",
    "streamer_num_requests_running",
    "streamer_num_requests_waiting",
    "streamer_kv_cache_usage_ratio",
    "streamer_kv_cache_blocks",
    "streamer_prefix_cache_queries_total",
    "streamer_prefix_cache_hits_total",
    "streamer_prefix_cache_preempted_queries_total",
    "streamer_prefix_cache_preempted_hits_total",
    "streamer_prefix_cache_hit_ratio",
    "streamer_cache_hits_total",
    "streamer_cache_misses_total",
    "streamer_cache_errors_total",
    "streamer_cache_l1_bytes",
    "streamer_consumer_lag",
    "streamer_ready",
    "streamer_device_memory_used_bytes",
    "streamer_device_memory_total_bytes",
    "streamer_device_utilization_ratio",
    "streamer_info",
}


def test_documented_names_are_exported() -> None:
    assert DOCUMENTED <= EXPORTED_METRIC_NAMES
    # No double suffix, and no bare counter family name that no series carries.
    assert not any(n.endswith("_total_total") for n in EXPORTED_METRIC_NAMES)
    assert "streamer_requests" not in EXPORTED_METRIC_NAMES


def test_process_collector_on_the_worker_registry() -> None:
    text = render(WorkerMetrics()).decode()
    assert "process_resident_memory_bytes" in text
    assert "process_cpu_seconds_total" in text


def test_instances_are_independent() -> None:
    a, b = WorkerMetrics(model="m", worker="a"), WorkerMetrics(model="m", worker="b")
    a.generation_tokens.inc(5)
    assert a.registry.get_sample_value("streamer_generation_tokens_total") == 5
    assert b.registry.get_sample_value("streamer_generation_tokens_total") == 0


def test_exposition_parses_and_has_zero_series_for_known_labels() -> None:
    m = WorkerMetrics(model="tiny", worker="w1", process_metrics=False)
    m.requests.labels(priority="high", outcome="completed").inc()
    m.time_to_first_token.labels(priority="high").observe(0.2)
    m.batch_size.observe(7)
    m.consumer_lag.labels(topic="llm.requests.high", partition="3").set(4)
    m.stage_busy_seconds.labels(stage="0").inc(0.5)
    m.set_ready(True)

    families = {f.name: f for f in text_string_to_metric_families(render(m).decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    for p in PRIORITIES:
        for o in OUTCOMES:
            key = ("streamer_requests_total", (("outcome", o), ("priority", p)))
            assert samples[key] == (1 if (p, o) == ("high", "completed") else 0)
    assert samples[("streamer_ready", ())] == 1
    assert samples[("streamer_consumer_lag", (("partition", "3"), ("topic", "llm.requests.high")))]
    # 7 sequences fall in the (4, 8] bucket.
    assert samples[("streamer_batch_size_bucket", (("le", "4.0"),))] == 0
    assert samples[("streamer_batch_size_bucket", (("le", "8.0"),))] == 1
    info = list(families["streamer_info"].samples)
    assert len(info) == 1 and info[0].labels["model"] == "tiny" and info[0].value == 1
    # Every sample name in a real exposition is one EXPORTED_METRIC_NAMES claims.
    assert {name for name, _ in samples} <= EXPORTED_METRIC_NAMES


def test_refresh_device_stats_never_raises() -> None:
    m = WorkerMetrics(process_metrics=False)
    m.refresh_device_stats()
    m.refresh_device_stats(["cpu"])
    assert m.registry.get_sample_value("streamer_errors_total", {"kind": "device_stats"}) is None


def test_kv_and_prefix_cache_series_exist_at_zero() -> None:
    m = WorkerMetrics(process_metrics=False)
    for state in KV_BLOCK_STATES:
        assert m.registry.get_sample_value("streamer_kv_cache_blocks", {"state": state}) == 0
    for name in ("streamer_prefix_cache_queries_total", "streamer_prefix_cache_hits_total",
                 "streamer_prefix_cache_hit_ratio"):
        assert m.registry.get_sample_value(name) == 0, name


def _engine_with(blocks: BlockManager) -> SimpleNamespace:
    """The parts of an Engine that EngineGauges.refresh reads."""
    scheduler = SimpleNamespace(num_running=0, num_waiting_in=lambda lane: 0)
    return SimpleNamespace(scheduler=scheduler, blocks=blocks, kv_usage=blocks.stats.usage)


def test_engine_gauges_follow_the_block_manager() -> None:
    """Counters advance by the block manager's new totals on every refresh, never twice."""
    m = WorkerMetrics(process_metrics=False)
    blocks = BlockManager(10, 4)
    engine = _engine_with(blocks)
    gauges = EngineGauges(engine, m, stages=1)  # type: ignore[arg-type]
    value = m.registry.get_sample_value

    gauges.refresh()
    assert value("streamer_prefix_cache_hit_ratio") == 0  # nothing queried yet: 0, not NaN
    shared = list(range(8))  # two full blocks
    blocks.allocate("a", [*shared, 50, 51])
    blocks.mark_computed("a", 10)
    blocks.allocate("b", [*shared, 60])  # hits the two shared blocks
    gauges.refresh()
    gauges.refresh()  # idempotent: no new lookups, no increments
    assert value("streamer_prefix_cache_queries_total") == 10 + 9
    assert value("streamer_prefix_cache_hits_total") == 8
    assert value("streamer_prefix_cache_hit_ratio") == pytest.approx(8 / 19)
    assert value("streamer_kv_cache_blocks", {"state": "used"}) == 4  # 3 of a's + b's own tail
    blocks.deallocate("a")
    blocks.deallocate("b")
    blocks.allocate("a", [*shared, 50, 51, 52], resumed=True)  # a preempted sequence resumes
    gauges.refresh()
    assert value("streamer_prefix_cache_queries_total") == 19  # the ratio's totals are untouched
    assert value("streamer_prefix_cache_preempted_queries_total") == 11
    assert value("streamer_prefix_cache_preempted_hits_total") == 8
    states = {s: value("streamer_kv_cache_blocks", {"state": s}) for s in KV_BLOCK_STATES}
    # a holds 3 blocks (2 hit + 1 new); a's old tail was empty and b's tail block was never full.
    assert states == {"used": 3, "cached": 0, "empty": 7}
    assert sum(states.values()) == blocks.num_blocks


# --- HTTP server ------------------------------------------------------------------------------


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Blocking GET via urllib (run in a thread): status, content type, body."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # a hang guard
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


async def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes and read the whole response (the server closes after one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return response


async def test_endpoints_and_readiness_flip() -> None:
    m = WorkerMetrics(model="tiny", worker="w1")
    state = {"ready": False}

    def ready() -> tuple[bool, str]:
        m.set_ready(state["ready"])
        return state["ready"], "" if state["ready"] else "model loading"

    server = MetricsServer(lambda: render(m), ready=ready, host="127.0.0.1", port=0)
    async with server:
        assert server.port != 0
        port = server.port

        status, ctype, body = await asyncio.to_thread(_get, port, "/readyz")
        assert status == 503 and ctype == "application/json"
        assert json.loads(body) == {"status": "unavailable", "reason": "model loading"}

        status, _, body = await asyncio.to_thread(_get, port, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}

        state["ready"] = True
        status, _, body = await asyncio.to_thread(_get, port, "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ok"

        status, ctype, body = await asyncio.to_thread(_get, port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert "streamer_ready" in names and "process_resident_memory_bytes" in names
        assert "streamer_ready 1.0" in body.decode()

        state["ready"] = False
        status, _, _ = await asyncio.to_thread(_get, port, "/readyz?verbose=1")
        assert status == 503

        status, _, _ = await asyncio.to_thread(_get, port, "/nope")
        assert status == 404

        head = await _raw(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")

        post = await _raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")

        garbage = await _raw(port, b"hello\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
    assert not server.started


async def test_failing_checks_and_render_do_not_crash() -> None:
    def boom() -> bool:
        raise RuntimeError("bug in check")

    def bad_render() -> bytes:
        raise RuntimeError("bug in render")

    async with MetricsServer(bad_render, healthy=boom, host="127.0.0.1", port=0) as server:
        status, _, body = await asyncio.to_thread(_get, server.port, "/healthz")
        assert status == 503 and json.loads(body)["reason"] == "check raised RuntimeError"
        status, _, _ = await asyncio.to_thread(_get, server.port, "/metrics")
        assert status == 500
        # Still serving after both failures.
        status, _, _ = await asyncio.to_thread(_get, server.port, "/readyz")
        assert status == 200


async def test_stop_is_idempotent_and_does_not_wait_for_idle_clients() -> None:
    server = MetricsServer(lambda: b"", host="127.0.0.1", port=0)
    await server.start()
    with pytest.raises(RuntimeError):
        await server.start()
    # A client that connects and sends nothing must not block shutdown.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await until(lambda: server._writers, what="the server holds the idle connection")
    await asyncio.wait_for(server.stop(), 60)  # a hang guard only
    await server.stop()
    # stop() closed the idle connection itself: the client reads the end of the stream, not the
    # 408 the server sends when its read timeout fires (which would mean stop() waited for it).
    assert await asyncio.wait_for(reader.read(), 60) == b""
    writer.close()
    assert not server.started
