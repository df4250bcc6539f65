"""A worker process on a broker of its own, through a broker restart and a shutdown without one.

The embedded broker loses its log on restart and numbers new records from 0 again: records at
positions the worker finished before must be served, not mistaken for redelivered copies. A worker
told to stop while the broker is gone exits within its bounds, and logs the outage in a few lines.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker
from streamer.client import StreamerClient
from streamer.config import KafkaSettings
from streamer.protocol import EventType
from streamer.topics import apply_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SERVED_BEFORE_RESTART = 5_000


async def _wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes],
                        timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log := await asyncio.to_thread(path.read_text, errors="replace")):
        assert proc.poll() is None, log[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}: " + log[-3000:]
        await asyncio.sleep(0.2)


async def _serve(bootstrap: str, prompts: list[str]) -> list[EventType]:
    async with StreamerClient(KafkaSettings(bootstrap_servers=bootstrap)) as client:
        handles = [await client.submit(p, max_tokens=1, priority="normal") for p in prompts]
        return [(await h.result(600)).outcome.type for h in handles]


async def test_restart_after_5000_requests_then_stop_without_a_broker(
    tmp_path: Path, tiny_model: Path
) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    bootstrap = broker.bootstrap_servers
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "worker", "--model", str(tiny_model),
             "--metrics-port", "0", "--bootstrap-servers", bootstrap,
             "--kv-cache-bytes", str(32 << 20), "--shutdown-grace-s", "2",
             "--shutdown-timeout-s", "3"],
            stdout=out, stderr=subprocess.STDOUT,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        await _wait_for_log(log_path, "partitions_assigned", proc)
        outcomes = await _serve(bootstrap, [f"before {i}" for i in range(SERVED_BEFORE_RESTART)])
        assert outcomes == [EventType.COMPLETED] * SERVED_BEFORE_RESTART

        broker.stop()
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "broker2.log").start()
        await apply_topics(KafkaSettings(bootstrap_servers=bootstrap))
        # New records at offsets 0, 1, ... of the same partitions: each one is served.
        after = await _serve(bootstrap, [f"after {i}" for i in range(200)])
        assert after == [EventType.COMPLETED] * 200
        assert proc.poll() is None

        broker.stop()
        await _wait_for_log(log_path, "broker_unreachable", proc)
        proc.send_signal(signal.SIGTERM)
        # Bounded by grace (2 s) + a few steps of shutdown_timeout (3 s); the failure this
        # guards against is a worker that never exits, so the wait is generous.
        rc = await asyncio.to_thread(proc.wait, 120)
        assert rc == 0
        text = log_path.read_text(errors="replace")
        assert "worker_stopped" in text
        assert text.count("Unable connect to node") <= 3, text[-3000:]
        assert text.count("broker_unreachable") <= 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()
