"""Where a fleet run's CPU went: per-process CPU seconds and the worker's own stage-busy counter.

The client sees only wall time. These figures split the Kafka path's cost between the worker
(engine compute vs everything else in it: intake, publishing, the event loop), the broker and
the load generator itself, which on a small machine all share the same cores.
"""

from __future__ import annotations

import asyncio
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


async def worker_counters(ports: list[int | None]) -> dict[str, float] | None:
    """Summed over workers: stage busy seconds, generated tokens, output records and bytes
    (None if any worker cannot be read)."""
    from streamer.observability.scrape import scrape

    if not ports or any(p is None for p in ports):
        return None
    results = await asyncio.gather(*(scrape(f"127.0.0.1:{p}") for p in ports))
    if not all(r.ok for r in results):
        return None
    out = {"busy": 0.0, "tokens": 0.0, "token_records": 0.0, "event_records": 0.0,
           "bytes": 0.0}
    for r in results:
        out["busy"] += sum(r.stage_busy.values())
        out["tokens"] += r.generation_tokens
        out["token_records"] += r.output_records.get("tokens", 0.0)
        out["event_records"] += r.output_records.get("events", 0.0)
        out["bytes"] += sum(r.output_bytes.values())
    return out


@dataclass(frozen=True)
class Snapshot:
    at: float
    worker_cpu: float | None
    counters: dict[str, float] | None
    broker_cpu: float | None
    client_cpu: float


async def snapshot(worker_pids: list[int | None], worker_ports: list[int | None],
                   broker_pid: int | None) -> Snapshot:
    cpus = [cpu_seconds(pid) for pid in worker_pids]
    cpu = None if not cpus or any(c is None for c in cpus) else sum(c for c in cpus if c)
    return Snapshot(time.monotonic(), cpu, await worker_counters(worker_ports),
                    cpu_seconds(broker_pid), time.process_time())


def usage(before: Snapshot, after: Snapshot) -> dict[str, float | None]:
    """CPU seconds each party used between two snapshots, next to the wall time."""
    def delta(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    def counter(name: str) -> float | None:
        if before.counters is None or after.counters is None:
            return None
        return after.counters[name] - before.counters[name]

    wall = after.at - before.at
    tokens, records = counter("tokens"), counter("token_records")
    events, nbytes = counter("event_records"), counter("bytes")
    broker = delta(before.broker_cpu, after.broker_cpu)
    out: dict[str, float | None] = {
        "wall_s": wall,
        "worker_cpu_s": delta(before.worker_cpu, after.worker_cpu),
        # Wall time the stages spent inside forward(): when a worker cannot get a whole core
        # it exceeds the worker's CPU seconds, which is how contention shows up.
        "worker_stage_busy_s": counter("busy"),
        "broker_cpu_s": broker,
        "client_cpu_s": after.client_cpu - before.client_cpu,
        "generated_tokens": tokens,
        "token_records": records,
        "event_records": events,
        "output_bytes": nbytes,
    }
    if tokens and records is not None and events is not None and nbytes is not None:
        # Kafka's cost of a token: records (chunks and events) per generated token, and so on.
        out["records_per_token"] = (records + events) / tokens
        out["tokens_per_chunk"] = tokens / records if records else None
        out["records_per_s"] = (records + events) / wall if wall > 0 else None
        out["bytes_per_s"] = nbytes / wall if wall > 0 else None
        out["broker_cpu_ms_per_token"] = broker / tokens * 1000 if broker is not None else None
    return out
