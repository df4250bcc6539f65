"""`streamer gateway`: the app under uvicorn, stopped cleanly on SIGTERM / SIGINT.

uvicorn picks httptools over its pure-Python h11 parser when it is installed, and the loop is
uvloop's when available: with hundreds of streams the gateway's cost is per SSE chunk written,
and both cut it several times over."""

from __future__ import annotations

import asyncio

import structlog
import uvicorn

from streamer.config import GatewayConfig
from streamer.gateway.app import Gateway

log = structlog.get_logger(__name__)


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    server = uvicorn.Server(uvicorn.Config(
        gateway.app(), host=config.host, port=config.port, log_config=None,
        access_log=False,  # request lines carry no secret, but they are the metrics' job
        lifespan="on", timeout_graceful_shutdown=10,
        backlog=2048,  # many streaming clients connect at once
    ))
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no event)
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("gateway_listening", host=config.host, port=port)
    await task
    if not server.started:
        raise SystemExit(1)  # uvicorn logged why (a port in use, the lifespan failed)


def run(config: GatewayConfig) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
