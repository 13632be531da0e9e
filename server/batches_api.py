"""OpenAI's Batch API: ``/v1/batches`` (create, list), ``/v1/batches/{batch_id}`` and its ``/cancel``; the
batches run in this process (``server.batch_runner``). Without ``--batch-dir`` these paths and ``/v1/files``
answer 404 saying so (``batch_api_off``)."""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from litestar import Controller, HttpMethod, Request, Response, get, post, route

from toolkit.errors import ObjectNotFoundError, PayloadTooLargeError, RequestError
from toolkit.server.batch_store import (
    BatchProgress,
    BatchRecord,
    OpenAIBatch,
    expiry_seconds,
    new_id,
)
from toolkit.server.limits import check_choice

__all__ = ["BATCH_ENDPOINTS", "BatchesController", "OpenAIBatchCreateRequest", "OpenAIBatchList", "batch_api_off",
           "forward_batch_api"]

BATCH_ENDPOINTS = ("/v1/embeddings", "/v1/score", "/v1/rerank", "/v2/embed")
WINDOW_S = {"24h": 24 * 3600}


class OpenAIBatchCreateRequest(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: Any = None  # {"anchor": "created_at", "seconds": N}: the output and error files' lifetime


class OpenAIBatchList(msgspec.Struct):
    object: Literal["list"]
    data: list[OpenAIBatch]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise RequestError(f"metadata has {len(metadata)} keys; at most 16", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise RequestError(f"metadata '{key[:64]}': keys are up to 64 characters, values up to 512",
                               param="metadata")


class BatchesController(Controller):
    path = "/v1/batches"
    tags = ["OpenAI Batch"]

    @post("/", status_code=200, summary="Create a batch of an uploaded JSONL file's requests (/v1/embeddings, "
                                        "/v1/score, /v1/rerank or /v2/embed)")
    async def create(self, request: Request, data: OpenAIBatchCreateRequest) -> OpenAIBatch:
        store, options = request.app.state.batch_store, request.app.state.options
        check_choice(data.endpoint, BATCH_ENDPOINTS, "endpoint")
        check_choice(data.completion_window, tuple(WINDOW_S), "completion_window")
        _check_metadata(data.metadata)
        source = store.file(data.input_file_id, param="input_file_id")
        if source.file.purpose != "batch":
            raise RequestError(f"file {data.input_file_id} has purpose '{source.file.purpose}': a batch reads a "
                               "file uploaded with purpose 'batch'", param="input_file_id")
        if source.lines > options.batch_max_requests:
            raise RequestError(f"file {data.input_file_id} has {source.lines} requests; a batch may have "
                               f"{options.batch_max_requests}", param="input_file_id")
        now = time.time_ns()
        batch = OpenAIBatch(id=new_id("batch"), endpoint=data.endpoint, input_file_id=data.input_file_id,
                            completion_window=data.completion_window, status="validating", created_at=now // 10**9,
                            expires_at=now // 10**9 + WINDOW_S[data.completion_window], metadata=data.metadata)
        expires_in = None
        if data.output_expires_after is not None:
            after = data.output_expires_after if isinstance(data.output_expires_after, dict) else {}
            expires_in = expiry_seconds(after.get("anchor"), after.get("seconds"), "output_expires_after")
        record = BatchRecord(batch, BatchProgress(), now, output_expires_in=expires_in)
        runner = request.app.state.batch_runner
        await runner.save(record)
        store.batches[batch.id] = record
        runner.submit(record)
        return batch

    @get("/", summary="List batches, newest first (OpenAI's cursor: after, limit)")
    async def list_batches(self, request: Request, after: str | None = None, limit: int = 20) -> OpenAIBatchList:
        if not 1 <= limit <= 100:
            raise RequestError(f"limit must be between 1 and 100, got {limit}", param="limit")
        records = sorted(request.app.state.batch_store.batches.values(), key=lambda r: r.created_ns, reverse=True)
        batches = [r.batch for r in records]
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        page = batches[:limit]
        return OpenAIBatchList("list", page, page[0].id if page else None, page[-1].id if page else None,
                               len(batches) > limit)

    @get("/{batch_id:str}", summary="A batch: its status, request counts and result files")
    async def retrieve(self, request: Request, batch_id: str) -> OpenAIBatch:
        return request.app.state.batch_store.batch(batch_id).batch

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch: it stops, keeping what it answered")
    async def cancel(self, request: Request, batch_id: str) -> OpenAIBatch:
        record = request.app.state.batch_store.batch(batch_id)
        status = record.batch.status
        if status in ("validating", "in_progress"):
            await request.app.state.batch_runner.cancel(record)
        elif status != "cancelling":
            raise RequestError(f"batch {batch_id} is {status}: only a validating or in-progress batch can be "
                               "cancelled", param="batch_id")
        return record.batch


@route(["/v1/files", "/v1/files/{rest:path}", "/v1/batches", "/v1/batches/{rest:path}"],
       http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.DELETE], include_in_schema=False)
async def batch_api_off(request: Request) -> None:
    """The Batch API's paths on a server without ``--batch-dir``: 404, saying how to turn it on."""
    raise ObjectNotFoundError("the Batch API (/v1/files, /v1/batches) is off on this server: start it with "
                              "--batch-dir DIR")


_FORWARDED = (b"authorization", b"content-type", b"content-length", b"x-request-id", b"accept")


@route(["/v1/files", "/v1/files/{rest:path}", "/v1/batches", "/v1/batches/{rest:path}"],
       http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.DELETE], include_in_schema=False,
       request_max_body_size=None)
async def forward_batch_api(request: Request) -> Response:
    """A model replica's Batch API paths: the request, whole, to the batch deployment, and its answer back."""
    options = request.app.state.options
    limit = options.batch_max_file_bytes + 64 * 1024  # the file, and the multipart framing around it
    if int(request.headers.get("content-length") or 0) > limit:
        raise PayloadTooLargeError(f"the file is larger than this server takes ({options.batch_max_file_bytes} "
                                   "bytes; --batch-max-file-mb)", param="file")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"the file is larger than this server takes ({options.batch_max_file_bytes} "
                                       "bytes; --batch-max-file-mb)", param="file")
    headers = [(k.encode(), v.encode()) for k, v in request.headers.items() if k.encode() in _FORWARDED]
    status, answer_headers, content = await request.app.state.batch_forward.forward.remote(
        request.method, request.url.path, request.url.query.encode(), headers, bytes(body))
    kept = {k.decode(): v.decode() for k, v in answer_headers if k.lower() in (b"content-type", b"x-request-id")}
    return Response(content, status_code=status, headers=kept, media_type=kept.pop("content-type", None))
