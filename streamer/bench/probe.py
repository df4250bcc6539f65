"""Where a fleet run's CPU went: per-process CPU seconds and the worker's own stage-busy counter.

The client sees only wall time. These figures split the Kafka path's cost between the worker
(engine compute vs everything else in it: intake, publishing, the event loop), the broker and
the load generator itself, which on a small machine all share the same cores.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

_PORT = re.compile(r'"port": (\d+), "event": "metrics_listening"')


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" that closes the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics_port(log_path: Path | None) -> int | None:
    """The port a worker logged with `metrics_listening` (the last one: logs are appended)."""
    if log_path is None or not log_path.exists():
        return None
    ports = _PORT.findall(log_path.read_text(errors="replace"))
    return int(ports[-1]) if ports else None


async def stage_busy_seconds(port: int | None) -> float | None:
    """Sum of the worker's `streamer_stage_busy_seconds_total`, or None if it cannot be read."""
    if port is None:
        return None
    from streamer.observability.scrape import scrape

    result = await scrape(f"127.0.0.1:{port}")
    return sum(result.stage_busy.values()) if result.ok else None


@dataclass(frozen=True)
class Snapshot:
    at: float
    worker_cpu: float | None
    worker_busy: float | None
    broker_cpu: float | None
    client_cpu: float


async def snapshot(worker_pid: int | None, worker_port: int | None,
                   broker_pid: int | None) -> Snapshot:
    return Snapshot(time.monotonic(), cpu_seconds(worker_pid),
                    await stage_busy_seconds(worker_port), cpu_seconds(broker_pid),
                    time.process_time())


def usage(before: Snapshot, after: Snapshot) -> dict[str, float | None]:
    """CPU seconds each party used between two snapshots, next to the wall time."""
    def delta(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    return {
        "wall_s": after.at - before.at,
        "worker_cpu_s": delta(before.worker_cpu, after.worker_cpu),
        # Wall time the stage spent inside forward(): when the worker cannot get a whole core
        # it exceeds the worker's CPU seconds, which is how contention shows up.
        "worker_stage_busy_s": delta(before.worker_busy, after.worker_busy),
        "broker_cpu_s": delta(before.broker_cpu, after.broker_cpu),
        "client_cpu_s": after.client_cpu - before.client_cpu,
    }
