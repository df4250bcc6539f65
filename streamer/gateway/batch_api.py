"""The Batch API's routes: files in, batches created and read, output files out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from streamer.config import GatewayConfig
from streamer.gateway import openai_format as fmt
from streamer.gateway.batch_store import BatchStore
from streamer.gateway.batches import ENDPOINTS, BatchRunner, parse_lines, window_seconds
from streamer.gateway.fleet import FleetView

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file


class BatchApi:
    def __init__(self, config: GatewayConfig, store: BatchStore, runner: BatchRunner,
                 fleet: FleetView) -> None:
        self.config = config
        self.store = store
        self.runner = runner
        self.fleet = fleet

    def routes(self) -> list[tuple[str, str, str, Any]]:
        return [
            ("files", "POST", "/v1/files", self.upload),
            ("files", "GET", "/v1/files/{file_id}", self.get_file),
            ("files", "GET", "/v1/files/{file_id}/content", self.file_content),
            ("batches", "POST", "/v1/batches", self.create),
            ("batches", "GET", "/v1/batches", self.list),
            ("batches", "GET", "/v1/batches/{batch_id}", self.get),
            ("batches", "POST", "/v1/batches/{batch_id}/cancel", self.cancel),
        ]

    async def upload(self, request: Request) -> Response:
        async with request.form(max_part_size=MAX_FILE_BYTES) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise fmt.invalid("send the file as multipart field `file`", "file")
            if purpose != "batch":
                raise fmt.invalid(f"purpose={purpose!r}: this gateway stores batch input "
                                  "files only (purpose=batch)", "purpose")
            content = await upload.read()
            name = upload.filename or "input.jsonl"
        return JSONResponse(self.store.add_file("batch", name, content))

    async def get_file(self, request: Request) -> Response:
        found = self.store.file(request.path_params["file_id"])
        if found is None:
            raise _missing("file", request.path_params["file_id"])
        return JSONResponse(found)

    async def file_content(self, request: Request) -> Response:
        content = self.store.file_content(request.path_params["file_id"])
        if content is None:
            raise _missing("file", request.path_params["file_id"])
        return Response(content, media_type="application/jsonl")

    async def create(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise fmt.invalid("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise fmt.invalid("the request body must be a JSON object")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise fmt.invalid(f"endpoint={endpoint!r}; expected one of {', '.join(ENDPOINTS)}",
                              "endpoint")
        window = window_seconds(body.get("completion_window", "24h"))
        file_id = str(body.get("input_file_id", ""))
        content = self.store.file_content(file_id)
        if content is None:
            raise _missing("file", file_id)
        header = request.headers.get("x-streamer-priority")
        priority = fmt.check_priority(header, "x-streamer-priority") if header else (
            fmt.check_priority(body["priority"], "priority") if body.get("priority")
            else self.config.batch_priority)
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        # Off the event loop: an input file can hold many thousands of lines.
        lines = await asyncio.to_thread(parse_lines, content, endpoint, (now + window) * 1000,
                                        batch_id)
        known = {m.name for m in self.fleet.models()}
        if known:  # with no worker announced, models cannot be checked: the lines wait
            lines = [line if line.error or line.model in known else dataclasses.replace(
                line, payload=None, error=fmt.ApiError(
                    404, f"The model `{line.model}` does not exist", code="model_not_found"))
                for line in lines]
        batch = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": file_id, "completion_window": body.get("completion_window",
                                                                         "24h"),
                 "status": "in_progress", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": now, "expires_at": now + window,
                 "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "metadata": body.get("metadata"), "priority": priority}
        await self.runner.create(batch, priority, lines)
        return JSONResponse(self.store.batch(batch_id))

    async def list(self, request: Request) -> Response:
        data = self.store.batches(int(request.query_params.get("limit", 20)))
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    async def get(self, request: Request) -> Response:
        found = self.store.batch(request.path_params["batch_id"])
        if found is None:
            raise _missing("batch", request.path_params["batch_id"])
        return JSONResponse(found)

    async def cancel(self, request: Request) -> Response:
        found = self.store.batch(request.path_params["batch_id"])
        if found is None:
            raise _missing("batch", request.path_params["batch_id"])
        if found["status"] in ("in_progress", "validating"):
            await self.runner.cancel(found)
        return JSONResponse(self.store.batch(found["id"]))


def _missing(what: str, name: str) -> fmt.ApiError:
    return fmt.ApiError(404, f"No {what} with id {name!r}", code=f"{what}_not_found")

