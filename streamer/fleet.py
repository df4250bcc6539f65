"""A local supervisor: N worker processes in one consumer group, restarted when they die."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from streamer.aio import cancel_and_wait
from streamer.broker import free_port
from streamer.observability.http import DEFAULT_METRICS_PORT, port_in_use

log = structlog.get_logger(__name__)

STATE_FILE = Path(".streamer/fleet.json")


def worker_metrics_port(base: int | None, index: int) -> int:
    """Worker `index`'s metrics port: base + index; base 0: a free port; None: 9400 + index, or
    a free port when that one is taken."""
    if base is None:
        wanted = DEFAULT_METRICS_PORT + index
        return free_port() if port_in_use(wanted) else wanted
    return base + index if base else free_port()


@dataclass
class WorkerProcess:
    index: int
    args: list[str]
    metrics_port: int
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    log_path: Path | None = None


@dataclass
class Fleet:
    """Runs `streamer worker` N times; worker i serves metrics on base_port + i.

    `worker_args` are passed to every worker, followed by its own `--metrics-port`. A base port
    of 0 gives every worker a free port; None gives worker i 9400 + i, or a free port when that
    one is taken. Either way the state file names the port each worker got.
    """

    worker_args: list[str]
    workers: int = 2
    base_metrics_port: int | None = DEFAULT_METRICS_PORT
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    state_file: Path | None = STATE_FILE
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        self.procs = [
            # base 0: every worker picks a free port (and logs it).
            WorkerProcess(
                i, self.worker_args, self.base_metrics_port + i if self.base_metrics_port else 0
            )
            for i in range(self.workers)
        ]
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for proc in self.procs:
            await self._spawn(proc)
        self._tasks = [asyncio.create_task(self._watch(p)) for p in self.procs]
        self._write_state()

    async def _spawn(self, proc: WorkerProcess) -> None:
        if not self.base_metrics_port:
            # A concrete port, so the state file (read by `streamer top`) names a real one.
            proc.metrics_port = worker_metrics_port(self.base_metrics_port, proc.index)
        env = {**os.environ, **self.env, "STREAMER_WORKER_ID": f"worker-{proc.index}"}
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            proc.log_path = self.log_dir / f"worker-{proc.index}.log"
            out = open(proc.log_path, "ab")  # noqa: SIM115, ASYNC230  (owned by the child)
        proc.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamer.cli",
            "worker",
            *proc.args,
            "--metrics-port",
            str(proc.metrics_port),
            env=env,
            stdout=out,
            stderr=out,
        )
        if out is not None:
            out.close()
        proc.started_at = time.monotonic()
        log.info(
            "worker_spawned",
            index=proc.index,
            pid=proc.process.pid,
            metrics=f"http://127.0.0.1:{proc.metrics_port}/metrics",
        )

    async def _watch(self, proc: WorkerProcess) -> None:
        while True:
            assert proc.process is not None
            code = await proc.process.wait()
            if self._stopping:
                return
            # Back off exponentially, reset after a worker that stayed up a minute.
            if time.monotonic() - proc.started_at > 60:
                proc.restarts = 0
            delay = min(self.max_backoff_s, 0.5 * 2**proc.restarts)
            proc.restarts += 1
            log.warning("worker_died", index=proc.index, code=code, restart_in_s=delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(proc)
            self._write_state()

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[index].process
        if proc is not None and proc.returncode is None:
            proc.send_signal(sig)

    async def stop(self, timeout: float = 60.0) -> None:
        """Forward SIGTERM (orderly drain), then SIGKILL what is still running at the timeout."""
        self._stopping = True
        for proc in self.procs:
            if proc.process is not None and proc.process.returncode is None:
                proc.process.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc.process is None:
                continue
            try:
                await asyncio.wait_for(proc.process.wait(), timeout)
            except TimeoutError:
                proc.process.kill()
                await proc.process.wait()
        await cancel_and_wait(*self._tasks)
        if self.state_file is not None:
            with contextlib.suppress(OSError):
                self.state_file.unlink()

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "workers": [
                {
                    "index": p.index,
                    "pid": p.process.pid if p.process else None,
                    "metrics": f"http://127.0.0.1:{p.metrics_port}/metrics",
                }
                for p in self.procs
            ]
        }
        self.state_file.write_text(json.dumps(state, indent=2))


async def run_fleet(worker_args: list[str], workers: int, base_port: int | None) -> int:
    fleet = Fleet(worker_args, workers, base_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    for proc in fleet.procs:
        print(
            f"worker {proc.index}: pid {proc.process.pid if proc.process else '?'}, metrics "
            f"http://127.0.0.1:{proc.metrics_port}/metrics",
            flush=True,
        )
    await stop.wait()
    await fleet.stop()
    return 0
