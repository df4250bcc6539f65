"""A tiny asyncio HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Built on :func:`asyncio.start_server` so the worker needs no web framework and the endpoints run
on the worker's own event loop: if that loop is wedged, probes time out, which is exactly what a
liveness probe should notice. It speaks just enough HTTP/1.1 for Prometheus, kubelet probes,
Docker healthchecks and curl: GET and HEAD, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

#: A check returns ``True``/``False``, or ``(ok, reason)`` to explain a failure in the body.
Check = Callable[[], bool | tuple[bool, str]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT_S = 5.0

DEFAULT_METRICS_PORT = 9400
"""The port a server without an explicit one tries first (falling back to a free port)."""


class MetricsPortInUse(OSError):
    """An explicitly requested metrics port is taken; the message says what to do."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"metrics port {port} on {host} is already in use: choose another with "
            "--metrics-port / STREAMER_METRICS_PORT, 0 for a free one, or leave it unset "
            f"({DEFAULT_METRICS_PORT}, or a free port when that is taken)"
        )
        self.errno = errno.EADDRINUSE
        self.port = port


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    """Whether binding `host:port` fails because something listens there (as the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _always_ok() -> bool:
    return True


class MetricsServer:
    """Serves Prometheus metrics and health endpoints on one port.

    Args:
        render: returns the metrics exposition (e.g. ``lambda: render(worker_metrics)``).
        healthy: liveness check for ``/healthz`` (process alive, loop not stalled).
        ready: readiness check for ``/readyz`` (model loaded, consuming).
        host: address to bind; ``0.0.0.0`` so probes from outside a container reach it.
        port: port to bind; 0 picks a free one, readable from :attr:`port` after start. None
            (the default): :data:`DEFAULT_METRICS_PORT`, or a free port (logged) when that one is
            taken. A port given explicitly that is taken raises :class:`MetricsPortInUse`.

    A check that raises counts as failing (503), so a bug in a check cannot crash the server
    or, worse, report healthy.
    """

    def __init__(
        self,
        render: Callable[[], bytes],
        *,
        healthy: Check = _always_ok,
        ready: Check = _always_ok,
        host: str = "0.0.0.0",
        port: int | None = None,
    ) -> None:
        self._render = render
        self._healthy = healthy
        self._ready = ready
        self.host = host
        self.port: int = DEFAULT_METRICS_PORT if port is None else port
        self._fallback = port is None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def started(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Bind and start serving; ``port=0`` picks a free port and stores it in :attr:`port`.

        Raises :class:`MetricsPortInUse` when an explicit port is taken; without one, a taken
        default port falls back to a free port.
        """
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        if host is not None:
            self.host = host
        if port is not None:
            self.port, self._fallback = port, False
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if not self._fallback:
                raise MetricsPortInUse(self.host, self.port) from None
            log.warning("metrics port %d is in use; taking a free port", self.port)
            self._server = await asyncio.start_server(self._handle, self.host, 0)
        # One socket: we bind one concrete address, so port 0 resolves to one port.
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and close open connections; safe to call more than once."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Since Python 3.12 wait_closed() also waits for open connections: close them first so
        # an idle client cannot hold shutdown hostage.
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except Exception:
            log.exception("metrics server: error handling request")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except TimeoutError:
            await self._send(writer, 408, b"", "text/plain", head_only=False)
            return
        except asyncio.LimitOverrunError:
            await self._send(writer, 400, b"", "text/plain", head_only=False)
            return
        if len(head) > _MAX_HEADER_BYTES:
            await self._send(writer, 400, b"", "text/plain", head_only=False)
            return

        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._send(writer, 400, b"bad request\n", "text/plain", head_only=False)
            return
        method, target, _version = parts
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"", "text/plain", head_only=False, allow="GET, HEAD")
            return

        if path == "/metrics":
            try:
                body = self._render()
            except Exception:
                log.exception("metrics server: render failed")
                await self._send(writer, 500, b"render failed\n", "text/plain", head_only)
                return
            await self._send(writer, 200, body, CONTENT_TYPE_LATEST, head_only)
        elif path in ("/healthz", "/readyz"):
            check = self._healthy if path == "/healthz" else self._ready
            ok, reason = _run_check(check)
            payload: dict[str, str] = {"status": "ok" if ok else "unavailable"}
            if reason:
                payload["reason"] = reason
            body = (json.dumps(payload) + "\n").encode()
            await self._send(writer, 200 if ok else 503, body, "application/json", head_only)
        else:
            await self._send(writer, 404, b"not found\n", "text/plain", head_only)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        head_only: bool,
        allow: str | None = None,
    ) -> None:
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if allow:
            headers.append(f"Allow: {allow}")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()


def _run_check(check: Check) -> tuple[bool, str]:
    """Evaluate a check, treating an exception as a failure with its type as the reason."""
    try:
        result = check()
    except Exception as exc:
        log.warning("health check %r raised", check, exc_info=True)
        return False, f"check raised {type(exc).__name__}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason)
    return bool(result), ""
