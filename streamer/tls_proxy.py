"""A small TLS terminator: accept TLS on one port, forward the plain bytes to another.

The embedded broker (Tansu) cannot serve TLS itself, so `streamer broker --tls-cert --tls-key`
runs it in plaintext on a loopback port, makes it advertise the TLS port, and puts this terminator
on that port. Kafka clients then speak TLS end to end as far as they can tell; a plaintext client
pointed at the TLS port fails its first request, because the terminator expects a TLS handshake.

The terminator runs its own asyncio event loop in a daemon thread, so it can sit beside blocking
code (the broker supervisor, a test) and be stopped from there. It does not look inside the
stream: it is not a Kafka proxy and adds no authentication of its own beyond optional client
certificates (`client_cafile`, mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def server_context(certfile: str, keyfile: str | None = None,
                   client_cafile: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with client_cafile, clients must present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_cafile:
        context.load_verify_locations(cafile=client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsTerminator:
    """Serve TLS on listen_host:listen_port and pipe each connection to target_host:target_port.

    start() returns once the port is listening (or raises: bad certificate, port in use);
    stop() closes the listener and every open connection and is idempotent.
    """

    def __init__(self, *, listen_port: int, target_port: int, certfile: str,
                 keyfile: str | None = None, listen_host: str = "127.0.0.1",
                 target_host: str = "127.0.0.1", client_cafile: str | None = None,
                 handshake_timeout: float = 10.0) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.certfile = certfile
        self.keyfile = keyfile
        self.client_cafile = client_cafile
        self.handshake_timeout = handshake_timeout
        self.connections_total = 0
        """Connections that completed the TLS handshake (for tests and logs)."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> TlsTerminator:
        if self._thread is not None:
            raise RuntimeError("TLS terminator already started")
        # Load the certificate here so that a bad path or key raises in the caller's thread.
        context = server_context(self.certfile, self.keyfile, self.client_cafile)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(context,),
                                        name=f"tls-terminator-{self.listen_port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"TLS terminator did not listen on {self.address} within {timeout}s")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join(timeout=5)
            self._thread = None
            raise RuntimeError(f"TLS terminator could not listen on {self.address}: {error}") \
                from error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        self._thread = None
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():  # pragma: no cover - only if the loop is wedged
            log.warning("TLS terminator thread on %s did not stop within %ss", self.address,
                        timeout)

    def __enter__(self) -> TlsTerminator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event-loop thread ---------------------------------------------------------------------

    def _run(self, context: ssl.SSLContext) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._exception_handler)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(context))
        except BaseException as exc:  # reported to start() if it has not returned yet
            if not self._ready.is_set():
                self._error = exc
            else:  # pragma: no cover
                log.exception("TLS terminator on %s failed", self.address)
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _serve(self, context: ssl.SSLContext) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, ssl=context,
            ssl_handshake_timeout=self.handshake_timeout, reuse_address=True,
        )
        self._ready.set()
        log.info("TLS terminator listening on %s -> %s:%s", self.address, self.target_host,
                 self.target_port)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections_total += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.target_host, self.target_port)
            except OSError as exc:
                log.warning("TLS terminator: upstream %s:%s unreachable: %s", self.target_host,
                            self.target_port, exc)
                return
            pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer)),
                     asyncio.ensure_future(_pump(upstream_reader, client_writer))]
            try:
                # Kafka never half-closes: when either side is done, the connection is done.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    writer.close()
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.wait_closed(), 1)
            self._tasks.discard(task)  # type: ignore[arg-type]

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Failed handshakes (plaintext clients, wrong CA, scanners) and resets are expected noise.
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.debug("TLS terminator: %s: %s", context.get("message"), exc)
            return
        loop.default_exception_handler(context)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
