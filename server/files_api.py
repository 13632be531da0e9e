"""OpenAI's Files API, as the Batch API needs it: ``/v1/files`` (upload, list), ``/v1/files/{file_id}``
(retrieve, delete) and ``/v1/files/{file_id}/content``, over the ``BatchStore`` of ``--batch-dir``.

An upload is streamed to disk as it arrives (multipart/form-data, as the ``openai`` client sends it), refused
past ``--batch-max-file-mb`` (413); only ``purpose=batch`` is taken. A batch's results are files of purpose
``batch_output``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Literal

import msgspec
import multipart
from litestar import Controller, Request, delete, get, post
from litestar.response import File

from toolkit.errors import PayloadTooLargeError, RequestError, UnsupportedMediaTypeError
from toolkit.server.batch_store import BatchStore, FileRecord, OpenAIFileObject, expiry_seconds
from toolkit.server.limits import check_choice

__all__ = ["FilesController", "OpenAIFileDeleted", "OpenAIFileList", "receive_upload"]

_FIELD_BYTES = 4096  # a form field other than the file (purpose, expires_after[...])
_MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file, beyond its limit


class OpenAIFileList(msgspec.Struct):
    object: Literal["list"]
    data: list[OpenAIFileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class OpenAIFileDeleted(msgspec.Struct):
    id: str
    object: Literal["file"]
    deleted: bool


def _count_requests(path: Path) -> int:
    """fsync ``path``; its non-blank lines."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        return sum(1 for raw in f if raw.strip())


async def receive_upload(request: Request, store: BatchStore, limit: int) -> FileRecord:
    """The multipart body's ``file`` streamed into the store (``purpose`` must be batch): its record.

    RequestError for a body without them, PayloadTooLargeError (413) past ``limit`` bytes of file."""
    media, params = multipart.parse_options_header(request.headers.get("content-type", ""))
    if media != "multipart/form-data" or not params.get("boundary"):
        raise UnsupportedMediaTypeError("POST /v1/files takes multipart/form-data with `purpose` and `file` "
                                        "(as the openai client's files.create sends them)")
    too_large = PayloadTooLargeError(f"the file is larger than this server takes ({limit} bytes; "
                                     "--batch-max-file-mb)", param="file")
    if int(request.headers.get("content-length") or 0) > limit + _MULTIPART_OVERHEAD:
        raise too_large
    fields: dict[str, bytearray] = {}
    target, filename, size = store.upload_path(), None, 0
    try:
        with open(target, "wb") as sink, multipart.PushMultipartParser(params["boundary"], max_segment_count=16) as parser:
            name = None

            def take(chunk: bytes) -> None:
                nonlocal name, filename, size
                for event in parser.parse(chunk):
                    if isinstance(event, multipart.MultipartSegment):
                        name = event.name
                        if name == "file":
                            if filename is not None:
                                raise RequestError("the form has two `file` parts: upload one file", param="file")
                            filename = os.path.basename(event.filename or "") or "upload.jsonl"
                        else:
                            fields[name] = bytearray()
                    elif event and name == "file":
                        size += len(event)
                        if size > limit:
                            raise too_large
                        sink.write(event)
                    elif event:
                        fields[name] += event
                        if len(fields[name]) > _FIELD_BYTES:
                            raise RequestError(f"the form field `{name[:40]}` is over {_FIELD_BYTES} bytes")

            async for chunk in request.stream():
                take(chunk)
            take(b"")
            if not parser.closed:
                raise RequestError("the multipart body ends before its closing boundary")
        if filename is None:
            raise RequestError("the form has no `file` part", param="file")
        purpose = fields.get("purpose", bytearray()).decode(errors="replace")
        check_choice(purpose, ("batch",), "purpose")
        expires_in = None
        if "expires_after[anchor]" in fields or "expires_after[seconds]" in fields:  # the openai client's form
            expires_in = expiry_seconds(fields.get("expires_after[anchor]", bytearray()).decode(errors="replace"),
                                        fields.get("expires_after[seconds]", bytearray()).decode(errors="replace"),
                                        "expires_after")
        lines = await asyncio.to_thread(_count_requests, target)
        return await asyncio.to_thread(store.add_file, target, filename[:255], "batch", lines, None, expires_in)
    except multipart.MultipartError as exc:
        raise RequestError(f"the multipart body is malformed: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def _store(request: Request) -> BatchStore:
    return request.app.state.batch_store


class FilesController(Controller):
    path = "/v1/files"
    tags = ["OpenAI Batch"]

    @post("/", status_code=200, request_max_body_size=None,
          summary="Upload a JSONL file of requests for a batch (multipart: purpose=batch, file)")
    async def upload(self, request: Request) -> OpenAIFileObject:
        options = request.app.state.options
        return (await receive_upload(request, _store(request), options.batch_max_file_bytes)).file

    @get("/", summary="List files, newest first (OpenAI's cursor: after, limit)")
    async def list_files(self, request: Request, after: str | None = None, limit: int = 10_000,
                         order: str = "desc", purpose: str | None = None) -> OpenAIFileList:
        if not 1 <= limit <= 10_000:
            raise RequestError(f"limit must be between 1 and 10000, got {limit}", param="limit")
        check_choice(order, ("asc", "desc"), "order")
        _store(request).drop_expired()
        records = sorted(_store(request).files.values(), key=lambda r: r.created_ns, reverse=order == "desc")
        files = [r.file for r in records if purpose is None or r.file.purpose == purpose]
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        page = files[:limit]
        return OpenAIFileList("list", page, page[0].id if page else None, page[-1].id if page else None,
                              len(files) > limit)

    @get("/{file_id:str}", summary="A file's object")
    async def retrieve(self, request: Request, file_id: str) -> OpenAIFileObject:
        return _store(request).file(file_id).file

    @get("/{file_id:str}/content", summary="A file's content (JSONL)", media_type="application/octet-stream")
    async def content(self, request: Request, file_id: str) -> File:
        store = _store(request)
        record = store.file(file_id)
        return File(store.content_path(file_id), filename=record.file.filename, media_type="application/octet-stream")

    @delete("/{file_id:str}", status_code=200, summary="Delete a file")
    async def remove(self, request: Request, file_id: str) -> OpenAIFileDeleted:
        await asyncio.to_thread(_store(request).delete_file, file_id)
        return OpenAIFileDeleted(file_id, "file", True)
