"""A throwaway fleet for `bench compare`: embedded broker, fresh topics, N workers.

Everything started here is stopped on the way out, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from streamer.broker import EmbeddedBroker
from streamer.config import KafkaSettings
from streamer.fleet import Fleet
from streamer.topics import apply_topics


@dataclass(frozen=True)
class LocalFleet:
    kafka: KafkaSettings
    prefix: str
    fleet: Fleet
    broker_pid: int | None


def worker_args(model: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                kv_cache_bytes: int | None, max_model_len: int | None) -> list[str]:
    """`streamer worker` flags that give the worker's engine the in-process engine's limits."""
    args = ["--model", model, "--devices", "cpu", "--max-num-seqs", str(max_num_seqs),
            "--max-num-batched-tokens", str(max_num_batched_tokens)]
    if kv_cache_bytes is not None:
        args += ["--kv-cache-bytes", str(kv_cache_bytes)]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    return args


@contextlib.asynccontextmanager
async def local_fleet(engine_args: list[str], *, log_dir: Path, workers: int = 1,
                      env: dict[str, str] | None = None,
                      start_timeout_s: float = 180.0) -> AsyncIterator[LocalFleet]:
    """Broker, topics under a fresh prefix, `workers` workers ready to consume; torn down after."""
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    broker = EmbeddedBroker(log_path=log_dir / "broker.log")
    await asyncio.to_thread(broker.start)
    fleet: Fleet | None = None
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        await apply_topics(kafka, prefix)
        fleet = Fleet([*engine_args, "--prefix", prefix,
                       "--bootstrap-servers", broker.bootstrap_servers],
                      workers=workers, base_metrics_port=0, log_dir=log_dir,
                      env={"STREAMER_LOG_LEVEL": "INFO", **(env or {})},
                      state_file=None)  # never overwrite the state of a fleet the user runs
        await fleet.start()
        await wait_until_consuming(fleet, within_s=start_timeout_s)
        yield LocalFleet(kafka, prefix, fleet,
                         broker.process.pid if broker.process is not None else None)
    finally:
        if fleet is not None:
            await fleet.stop(timeout=30)
        await asyncio.to_thread(broker.stop)


async def wait_until_consuming(fleet: Fleet, *, within_s: float) -> None:
    """Until every worker has its partitions: a request sent earlier would wait for the group
    to form, and its TTFT would measure the rebalance rather than the fleet."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        logs = [p.log_path.read_text(errors="replace") if p.log_path and p.log_path.exists()
                else "" for p in fleet.procs]
        if all("partitions_assigned" in text for text in logs):
            return
        for proc in fleet.procs:
            if proc.process is not None and proc.process.returncode is not None:
                raise RuntimeError(f"worker {proc.index} exited with {proc.process.returncode}; "
                                   f"see {proc.log_path}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"workers not consuming within {within_s}s; see {fleet.log_dir}")
