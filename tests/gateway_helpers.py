"""Start real `streamer gateway` processes for tests, on free ports, and always stop them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import ROOT

STARTUP_S = 120.0


@dataclass
class GatewayProc:
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def port(self) -> int:
        match = re.search(r'"port": (\d+), "event": "gateway_listening"', self.log())
        assert match, self.log()[-2000:]
        return int(match.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout
        while "gateway_listening" not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.process.returncode}):\n"
                                   + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not listen:\n" + self.log()[-3000:])
            time.sleep(0.05)

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        """Until /readyz answers 200: a worker's announcement has been read."""
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("gateway never ready:\n" + self.log()[-3000:])
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Gateways:
    """A factory of gateway processes; `close()` stops every one (call it in a finally)."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.bootstrap = bootstrap
        self.tmp = tmp
        self.started: list[GatewayProc] = []

    def start(self, prefix: str, *extra: str, db: Path | None = None,
              env: dict[str, str] | None = None) -> GatewayProc:
        log_path = self.tmp / f"gateway{len(self.started)}.log"
        args = [sys.executable, "-m", "streamer.cli", "gateway", "--prefix", prefix, "--port",
                "0", "--host", "127.0.0.1", "--bootstrap-servers", self.bootstrap,
                "--batch-db", str(db or self.tmp / f"gateway{len(self.started)}.db"), *extra]
        with open(log_path, "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**os.environ, "STREAMER_LOG_LEVEL": "INFO",
                                            **(env or {})})
        proc = GatewayProc(process, log_path, args)
        self.started.append(proc)
        proc.wait_listening()
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.kill()
