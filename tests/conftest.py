"""Shared fixtures: a real broker, real model folders, real worker processes (always stopped)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from aiokafka.partitioner import DefaultPartitioner

from streamer.broker import EmbeddedBroker
from streamer.client import StreamerClient
from streamer.config import KafkaSettings
from streamer.tiny_model import TinyModelSpec, ensure_tiny_model
from streamer.topics import apply_topics, load_specs

ROOT = Path(__file__).resolve().parent.parent

# Tiny models gain nothing from intra-op threads, and with worker processes sharing two cores,
# OpenMP's spinning threads slow every process down many times over.
torch.set_num_threads(1)
# Workers here run the model on their own thread: a model process costs each start a second
# interpreter (~3 s on 2 cores). tests/test_model_process.py runs workers with the default.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "STREAMER_LOG_LEVEL": "INFO", "STREAMER_MODEL_PROCESS": "0"}
DEFAULT_MODEL_PROCESS = {"STREAMER_MODEL_PROCESS": ""}  # none: the worker's default (on)


def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


async def until(condition: Callable[[], object], timeout: float = 120.0, what: str = "") -> None:
    """Wait for an eventual condition. The timeout only catches a hang: it is never the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what or condition}")
        await asyncio.sleep(0.01)


def partitions_of(topic: str) -> int:
    """Partition count of a topic, as `streamer topics apply` creates it (topics/*.yaml)."""
    prefix = topic.split(".", 1)[0]
    return {spec.name: spec.partitions for spec in load_specs(prefix)}[topic]


def partition_of(key: str, partitions: int) -> int:
    """Where a record keyed `key` lands: Kafka's default (murmur2) partitioner, as aiokafka's."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(key.encode(), every, every))


def ids_on_every_partition(stem: str, partitions: int) -> list[str]:
    """One request id per partition (index i lands on partition i)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        found.setdefault(partition_of(f"{stem}-{n}", partitions), f"{stem}-{n}")
        n += 1
    return [found[p] for p in range(partitions)]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS if set; else Kafka in Docker (testcontainers) if an engine
    answers; else the embedded broker on a free port."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_engine_answers():
        try:
            from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            with KafkaContainer("apache/kafka:3.9.0").with_kraft() as kafka:
                yield kafka.get_bootstrap_server()
            return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    return ensure_tiny_model(models_dir / "llama", TinyModelSpec(arch="llama"))


@pytest.fixture(scope="session")
def make_model(models_dir: Path) -> Callable[..., Path]:
    def make(arch: str = "llama", **spec: object) -> Path:
        name = arch + "".join(f"-{k}{v}" for k, v in sorted(spec.items()))
        return ensure_tiny_model(models_dir / name, TinyModelSpec(arch=arch, **spec))  # type: ignore[arg-type]

    return make


@pytest.fixture
async def prefix(kafka_settings: KafkaSettings) -> str:
    """A fresh topic prefix per test, topics applied, so tests never see each other's data."""
    name = f"t{uuid.uuid4().hex[:10]}"
    await apply_topics(kafka_settings, name)
    return name


@pytest.fixture
async def client(kafka_settings: KafkaSettings, prefix: str) -> AsyncIterator[StreamerClient]:
    async with StreamerClient(kafka_settings, prefix) as c:
        yield c


class Gate:
    """The engine's test gate (docs/testing.md): a file that holds engine steps while it exists.

    Give it to an in-process engine as `EngineConfig(test_gate=str(gate.path))`, or to a worker
    process with `start_worker(gate=gate)` (it sets STREAMER_TEST_GATE)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def env(self) -> dict[str, str]:
        return {"STREAMER_TEST_GATE": str(self.path)}

    def hold(self) -> None:
        """No new engine step starts (steps in flight finish)."""
        self._write("")

    def hold_at(self, tokens: int) -> None:
        """Steps run until some request has `tokens` output tokens, then hold."""
        self._write(f"tokens={tokens}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, text: str) -> None:
        # Atomic: the engine never reads a half-written rule.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    """A test gate file, open (absent) at first and removed at teardown."""
    g = Gate(tmp_path / "gate")
    yield g
    g.release()


@dataclass
class WorkerProc:
    process: subprocess.Popen[bytes]
    log_path: Path
    name: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def metrics_port(self) -> int | None:
        match = re.search(r'"port": (\d+), "event": "metrics_listening"', self.log())
        return int(match.group(1)) if match else None

    def wait_for(self, text: str, timeout: float = 120.0, count: int = 1) -> None:
        """Wait until `text` is in the log (at least `count` times)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited ({self.process.returncode}):\n"
                                   + self.log()[-3000:])
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name}: no {text!r} within {timeout}s:\n" + self.log()[-3000:])

    async def await_for(self, text: str, timeout: float = 120.0, count: int = 1) -> None:
        await asyncio.to_thread(self.wait_for, text, timeout, count)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def spawn_worker(bootstrap: str, prefix: str, model: Path, log_dir: Path, name: str,
                 *extra: str, env: dict[str, str] | None = None,
                 gate: Gate | None = None) -> WorkerProc:
    """Start one `streamer worker` process (not waiting for it); the caller stops it."""
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "worker", "--model", str(model),
         "--prefix", prefix, "--metrics-port", "0", "--worker-id", name,
         "--bootstrap-servers", bootstrap, *extra],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, **WORKER_ENV, **(gate.env if gate else {}), **(env or {})},
    )
    out.close()
    return WorkerProc(process, log_path, name)


@pytest.fixture
def start_worker(
    kafka_bootstrap: str, prefix: str, tiny_model: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProc]]:
    """Start `streamer worker` processes; every one is stopped at teardown, pass or fail."""
    started: list[WorkerProc] = []

    def start(*extra: str, model: Path | None = None, wait: bool = True,
              env: dict[str, str] | None = None, gate: Gate | None = None) -> WorkerProc:
        proc = spawn_worker(kafka_bootstrap, prefix, model or tiny_model, tmp_path,
                            f"w{len(started)}", *extra, env=env, gate=gate)
        started.append(proc)
        if wait:
            proc.wait_for("partitions_assigned")
        return proc

    yield start
    for proc in started:
        proc.kill()


# -- one worker that a module's independent checks share
#
# A worker start costs ~20 s on two cores, most of it the consumer group's first join. Tests that
# need a default worker and nothing of their own (flags, a fresh group, an exact metric count)
# share one per module: each uses fresh request ids on the module's topics, and leaves the gate
# open and the engine idle for the next (`shared` checks that after every test).


@dataclass
class SharedWorker:
    prefix: str
    worker: WorkerProc
    gate: Gate

    def running(self) -> float:
        """Requests the worker holds (running or waiting), from its /metrics."""
        import urllib.request

        url = f"http://127.0.0.1:{self.worker.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(("streamer_num_requests_running",
                                       "streamer_num_requests_waiting")))


@pytest.fixture(scope="module")
async def shared_prefix(kafka_settings: KafkaSettings) -> str:
    """The topic prefix of the module's shared worker (a module may override it)."""
    name = f"m{uuid.uuid4().hex[:10]}"
    await apply_topics(kafka_settings, name)
    return name


@pytest.fixture(scope="module")
def shared_worker(
    kafka_bootstrap: str, shared_prefix: str, tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedWorker]:
    """One default worker (behind an open test gate) for the module; stopped at its end."""
    folder = tmp_path_factory.mktemp("shared")
    gate = Gate(folder / "gate")
    proc = spawn_worker(kafka_bootstrap, shared_prefix, tiny_model, folder, "shared", gate=gate)
    try:
        proc.wait_for("partitions_assigned")
        yield SharedWorker(shared_prefix, proc, gate)
    finally:
        gate.release()
        proc.kill()


@pytest.fixture
async def shared(shared_worker: SharedWorker) -> AsyncIterator[SharedWorker]:
    """The module's shared worker for one test; afterwards the gate is open again and the
    worker holds no request (an eventual condition), so the next test finds it as new."""
    yield shared_worker
    shared_worker.gate.release()
    await until(lambda: shared_worker.running() == 0, timeout=60, what="shared worker idle")


@pytest.fixture
async def shared_client(kafka_settings: KafkaSettings,
                        shared: SharedWorker) -> AsyncIterator[StreamerClient]:
    """A fresh client on the shared worker's topics."""
    async with StreamerClient(kafka_settings, shared.prefix) as c:
        yield c
