"""The gateway's HTTP app: routes, auth, metrics, and the Kafka parts' lifecycle.

    GET  /v1/models, /v1/models/{model}      the models live workers announce
    POST /v1/chat/completions, /v1/completions   (completions.py)
    POST /v1/files, GET /v1/files/{id}[/content], POST /v1/batches, GET /v1/batches[/{id}],
    POST /v1/batches/{id}/cancel             (batch_api.py)
    GET  /healthz, /readyz, /metrics         no authentication
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from streamer.config import GatewayConfig, consumer_group
from streamer.gateway.auth import ApiKeys, load_keys
from streamer.gateway.batch_api import BatchApi
from streamer.gateway.batches import BatchRunner, BatchStore
from streamer.gateway.completions import Completions
from streamer.gateway.fleet import FleetView
from streamer.gateway.metrics import GatewayMetrics
from streamer.gateway.openai_format import ApiError
from streamer.gateway.streams import Streams
from streamer.protocol import PRIORITIES

log = structlog.get_logger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class Gateway:
    """Builds the parts, starts them in order and stops them in reverse (the app's lifespan)."""

    def __init__(self, config: GatewayConfig) -> None:
        config.validate()
        self.config = config
        self.keys = ApiKeys(load_keys(config.api_keys, config.api_key_file))
        self.metrics = GatewayMetrics()
        self.streams = Streams(config.kafka, config.prefix)
        self.fleet = FleetView(config.kafka, config.prefix,
                               consumer_group(config.prefix, config.group_id),
                               ttl_s=config.worker_ttl_s, refresh_s=config.backlog_refresh_s,
                               max_backlog=config.max_backlog)
        self.completions = Completions(config, self.streams, self.fleet, self.metrics)
        self.store = BatchStore(config.batch_db)
        self.runner = BatchRunner(config.kafka, config.prefix, self.store, self.metrics)
        self.batches = BatchApi(config, self.store, self.runner, self.fleet)
        self.started = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        log.info("gateway_starting", prefix=self.config.prefix, auth=self.keys.enabled)
        await self.streams.start()
        try:
            await self.fleet.start()
            try:
                await self.runner.start()
                try:
                    self.started = True
                    yield
                finally:
                    self.started = False
                    await self.runner.stop()
            finally:
                await self.fleet.stop()
        finally:
            await self.streams.stop()
            self.store.close()
            log.info("gateway_stopped")

    # ------------------------------------------------------------------ routes

    def app(self) -> Starlette:
        v1 = [
            ("models", "GET", "/v1/models", self.list_models),
            ("models", "GET", "/v1/models/{model:path}", self.get_model),
            ("chat", "POST", "/v1/chat/completions",
             lambda r: self.completions.handle(r, "chat")),
            ("completion", "POST", "/v1/completions",
             lambda r: self.completions.handle(r, "completion")),
            *self.batches.routes(),
        ]
        routes = [Route(path, self._guard(name, handler), methods=[method])
                  for name, method, path, handler in v1]
        routes += [Route("/healthz", self.healthz), Route("/readyz", self.readyz),
                   Route("/metrics", self.metrics_page)]
        return Starlette(routes=routes, lifespan=self.lifespan,
                         exception_handlers={HTTPException: _http_error})  # type: ignore[dict-item]

    def _guard(self, endpoint: str, handler: Handler) -> Handler:
        """Authentication, OpenAI-shaped errors and the request counter around a route."""

        async def guarded(request: Request) -> Response:
            try:
                self.keys.check(request.headers.get("authorization"))
                response = await handler(request)
            except ApiError as error:
                self.metrics.errors.labels(code=str(error.code)).inc()
                response = JSONResponse(error.body(), status_code=error.status)
            except Exception as exc:  # a bug: still an OpenAI-shaped answer, and a log line
                log.exception("gateway_route_failed", endpoint=endpoint, error=repr(exc)[:300])
                error = ApiError(500, "internal error in the gateway", code="internal")
                self.metrics.errors.labels(code="internal").inc()
                response = JSONResponse(error.body(), status_code=500)
            self.metrics.requests.labels(endpoint=endpoint,
                                         status=str(response.status_code)).inc()
            return response

        return guarded

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list",
                             "data": [self._model(m.name) for m in self.fleet.models()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in {m.name for m in self.fleet.models()}:
            raise ApiError(404, f"The model `{name}` does not exist", code="model_not_found",
                           param="model")
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict[str, object]:
        info = next(m for m in self.fleet.models() if m.name == name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "streamer",
                "workers": info.workers, "ready_workers": info.ready}

    async def healthz(self, request: Request) -> Response:
        if not self.started:
            return PlainTextResponse("starting", status_code=503)
        return PlainTextResponse("ok")

    async def readyz(self, request: Request) -> Response:
        if not self.started:
            return PlainTextResponse("starting", status_code=503)
        if self.fleet.ready_workers() == 0:
            return PlainTextResponse("no worker is ready", status_code=503)
        return PlainTextResponse("ok")

    async def metrics_page(self, request: Request) -> Response:
        def refresh() -> None:
            self.metrics.ready_workers.set(self.fleet.ready_workers())
            for lane in PRIORITIES:
                if lane in self.fleet.backlog:
                    self.metrics.backlog.labels(lane=lane).set(self.fleet.backlog[lane])

        return Response(self.metrics.render(refresh),
                        media_type="text/plain; version=0.0.4; charset=utf-8")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = ApiError(exc.status_code, str(exc.detail), code="not_found"
                     if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


def create_app(config: GatewayConfig) -> Starlette:
    return Gateway(config).app()
