"""OpenAI's Files and Batch endpoints over producer/batches.py's BatchClient.

Uploaded files live in a directory (CHATQUEUE_GATEWAY_FILES_DIR, a volume in compose), one file
per id. A batch's output and error files are not stored: `file-<batch id>-output` and
`file-<batch id>-error` are its results, read from Redis when downloaded, in input order.
Every call is AsyncBatchClient's (producer/aio_batches.py): no batch call runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from producer.aio_batches import AsyncBatchClient
from producer.batches import DEFAULT_WINDOW, ENDPOINT, new_batch_id, parse_window

if TYPE_CHECKING:
    from gateway.app import Gateway

_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_RESULT_FILE = re.compile(r"^file-(batch_[A-Za-z0-9_-]{1,64})-(output|error)$")
_FINAL = ("completed", "expired", "cancelled", "failed")


class Batches:
    def __init__(self, gateway: Gateway, files_dir: Path, max_file_bytes: int) -> None:
        self.gateway, self.files_dir, self.max_file_bytes = gateway, files_dir, max_file_bytes
        self._submitting: set[asyncio.Task[Any]] = set()

    @property
    def client(self) -> AsyncBatchClient:
        return AsyncBatchClient(self.gateway.client)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files/{file_id}", self.file_info, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # -- files ---------------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        from gateway.app import ApiError

        self.gateway.authorize(request)
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise ApiError(411, "a file upload needs a Content-Length",
                           type_="invalid_request_error", code="length_required")
        if int(declared) > self.max_file_bytes:
            raise ApiError(413, f"upload: {declared} bytes exceeds this gateway's limit of "
                           f"{self.max_file_bytes}", type_="invalid_request_error",
                           code="request_too_large", limit=self.max_file_bytes,
                           value=int(declared))
        async with request.form(max_files=1, max_fields=4) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise ApiError(400, f"purpose: only 'batch' is supported (got {purpose!r})",
                               type_="invalid_request_error", code="invalid_request",
                               param="purpose")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file: a file part is required",
                               type_="invalid_request_error", code="invalid_request",
                               param="file")
            file_id = f"file-{uuid.uuid4().hex}"
            self.files_dir.mkdir(parents=True, exist_ok=True)
            path, size = self.files_dir / file_id, 0
            # Written in threads: a large upload never blocks the event loop on the disk.
            sink = await asyncio.to_thread(path.open, "wb")
            try:
                while block := await upload.read(1 << 20):
                    await asyncio.to_thread(sink.write, block)
                    size += len(block)
            finally:
                await asyncio.to_thread(sink.close)
            info = {"id": file_id, "object": "file", "bytes": size,
                    "created_at": int(time.time()), "filename": upload.filename or file_id,
                    "purpose": "batch", "status": "processed", "status_details": None}
        (self.files_dir / f"{file_id}.json").write_text(json.dumps(info))
        return JSONResponse(info)

    async def file_info(self, request: Request) -> Response:
        self.gateway.authorize(request)
        file_id = request.path_params["file_id"]
        if (match := _RESULT_FILE.match(file_id)) is not None:
            await self._batch(match.group(1))  # 404 when no such batch
            return JSONResponse({"id": file_id, "object": "file", "bytes": None,
                                 "created_at": int(time.time()), "filename": f"{file_id}.jsonl",
                                 "purpose": "batch_output", "status": "processed"})
        return JSONResponse(json.loads(self._stored(file_id, ".json").read_text()))

    async def file_content(self, request: Request) -> Response:
        self.gateway.authorize(request)
        file_id = request.path_params["file_id"]
        if (match := _RESULT_FILE.match(file_id)) is not None:
            batch_id, kind = match.group(1), match.group(2)
            await self._batch(batch_id)
            return StreamingResponse(self._results(batch_id, kind),
                                     media_type="application/jsonl")
        # Sent in chunks read in threads: never whole in memory, never a read on the loop.
        return FileResponse(self._stored(file_id, ""), media_type="application/jsonl")

    def _stored(self, file_id: str, suffix: str) -> Path:
        from gateway.app import ApiError

        path = self.files_dir / f"{file_id}{suffix}"
        if not _FILE_ID.match(file_id) or not path.is_file():
            raise ApiError(404, f"no such file: {file_id}", type_="invalid_request_error",
                           code="not_found", param="file_id")
        return path

    async def _results(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """The batch's lines of one kind, read as they are sent: a large batch is never whole
        in memory."""
        async for line_kind, line in self.client.results(batch_id):
            if line_kind == kind:
                yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

    # -- batches -------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        from gateway.app import ApiError

        self.gateway.authorize(request)
        body = await self.gateway.read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", type_="invalid_request_error",
                           code="invalid_request")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window",
                                      "metadata"})
        if unknown:
            raise _bad(f"{unknown[0]}: not supported by this server", unknown[0])
        if body.get("endpoint", ENDPOINT) != ENDPOINT:
            raise _bad(f"endpoint: only {ENDPOINT} is served (got {body.get('endpoint')!r})",
                       "endpoint")
        window = body.get("completion_window", DEFAULT_WINDOW)
        try:
            parse_window(str(window))
        except ValueError as exc:
            raise _bad(f"completion_window: {exc}", "completion_window") from None
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise _bad("metadata: an object of strings", "metadata")
        path = self._stored(str(body.get("input_file_id")), "")
        batch_id = new_batch_id()
        submitting = asyncio.ensure_future(self.client.submit(
            path, window=str(window), batch_id=batch_id, metadata=metadata))
        self._submitting.add(submitting)
        submitting.add_done_callback(self._submitting.discard)
        # Answer once the batch exists (the lines go on being queued, as OpenAI's validating).
        deadline = time.monotonic() + 10
        while not submitting.done() and time.monotonic() < deadline:
            try:
                return JSONResponse(self._with_files(await self.client.status(batch_id)))
            except LookupError:
                await asyncio.sleep(0.02)
        submitting.result()  # raises what the submission raised
        return JSONResponse(await self._batch(batch_id))

    async def retrieve(self, request: Request) -> Response:
        self.gateway.authorize(request)
        return JSONResponse(await self._batch(request.path_params["batch_id"]))

    async def cancel(self, request: Request) -> Response:
        self.gateway.authorize(request)
        batch_id = request.path_params["batch_id"]
        await self._batch(batch_id)
        return JSONResponse(self._with_files(await self.client.cancel(batch_id)))

    async def list(self, request: Request) -> Response:
        self.gateway.authorize(request)
        limit = request.query_params.get("limit", "20")
        count = int(limit) if limit.isdigit() and 0 < int(limit) <= 100 else 20
        data = [self._with_files(b) for b in await self.client.list(count)]
        return JSONResponse({"object": "list", "data": data,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})

    async def _batch(self, batch_id: str) -> dict[str, Any]:
        from gateway.app import ApiError

        try:
            return self._with_files(await self.client.status(batch_id))
        except LookupError:
            raise ApiError(404, f"no such batch: {batch_id}", type_="invalid_request_error",
                           code="not_found", param="batch_id") from None

    @staticmethod
    def _with_files(batch: dict[str, Any]) -> dict[str, Any]:
        """The result files of a batch that is over: its output and error lines."""
        if batch["status"] in _FINAL:
            batch = {**batch, "output_file_id": f"file-{batch['id']}-output",
                     "error_file_id": f"file-{batch['id']}-error"}
        return batch


def _bad(message: str, param: str) -> Exception:
    from gateway.app import ApiError

    return ApiError(400, message, type_="invalid_request_error", code="invalid_request",
                    param=param)
