"""The Batch API's files and batches on disk, under ``--batch-dir``.

::

    DIR/files/<file-id>.jsonl            an uploaded file, or a batch's output / error file
    DIR/files/<file-id>.json             its record (OpenAI's file object, and its line count)
    DIR/batches/<batch-id>.json          a batch: OpenAI's batch object and its progress
    DIR/batches/<batch-id>.output.jsonl  its answered lines so far, and .errors.jsonl its failed lines:
                                         only the prefix its progress records is committed (see batch_runner)
    DIR/uploads/                         uploads in flight (emptied at start)

Ids are made here (``file-`` / ``batch_`` and 24 hex digits) and checked against that shape before any path is
built, so no request can name a path outside the directory. Records are written whole, to a temporary name,
fsynced and renamed over the old one: a server killed at any moment leaves the old record or the new one.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Literal

import msgspec

from toolkit.errors import ConfigError, ObjectNotFoundError, RequestError

EXPIRY_RANGE = (3600, 2_592_000)  # OpenAI's: one hour to 30 days


def expiry_seconds(anchor, seconds, param: str) -> int:
    """OpenAI's ``expires_after`` (``{"anchor": "created_at", "seconds": N}``) as N; RequestError naming the rule."""
    if anchor != "created_at":
        raise RequestError(f"{param}.anchor must be 'created_at', got {str(anchor)[:40]!r}", param=param)
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = None
    if value is None or isinstance(seconds, bool) or not EXPIRY_RANGE[0] <= value <= EXPIRY_RANGE[1]:
        raise RequestError(f"{param}.seconds must be an integer between {EXPIRY_RANGE[0]} (one hour) and "
                           f"{EXPIRY_RANGE[1]} (30 days), got {str(seconds)[:40]!r}", param=param)
    return value

__all__ = ["EXPIRY_RANGE", "expiry_seconds", "BatchProgress", "BatchRecord", "BatchStore", "FileRecord", "OpenAIBatch", "OpenAIBatchErrors",
           "OpenAIBatchRequestCounts", "OpenAIFileObject", "new_id"]

_IDS = {"file": re.compile(r"file-[0-9a-f]{24}\Z"), "batch": re.compile(r"batch_[0-9a-f]{24}\Z")}
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]


def new_id(kind: Literal["file", "batch"]) -> str:
    return ("file-" if kind == "file" else "batch_") + secrets.token_hex(12)


class OpenAIFileObject(msgspec.Struct, omit_defaults=False):
    """OpenAI's file object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileRecord(msgspec.Struct):
    file: OpenAIFileObject
    lines: int  # non-blank lines: the requests a batch of it would have
    created_ns: int  # listing order


class OpenAIBatchRequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class OpenAIBatchError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class OpenAIBatchErrors(msgspec.Struct):
    data: list[OpenAIBatchError]
    object: Literal["list"] = "list"


class OpenAITokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OpenAIOutputDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class OpenAIBatchUsage(msgspec.Struct, omit_defaults=False):
    """OpenAI's ``BatchUsage``: the answered lines' input tokens (an embedding, score or rerank outputs none)."""

    input_tokens: int = 0
    input_tokens_details: OpenAITokensDetails = msgspec.field(default_factory=OpenAITokensDetails)
    output_tokens: int = 0
    output_tokens_details: OpenAIOutputDetails = msgspec.field(default_factory=OpenAIOutputDetails)
    total_tokens: int = 0


class OpenAIBatch(msgspec.Struct, omit_defaults=False):
    """OpenAI's batch object (``openai.types.Batch``)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    object: Literal["batch"] = "batch"
    errors: OpenAIBatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: OpenAIBatchRequestCounts = msgspec.field(default_factory=OpenAIBatchRequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: OpenAIBatchUsage = msgspec.field(default_factory=OpenAIBatchUsage)


class BatchProgress(msgspec.Struct):
    """How far a batch got, as last committed: the input lines consumed (answered, failed or blank), the input's
    byte offset after them, and the committed sizes of the partial output and error files."""

    line: int = 0
    offset: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    completed: int = 0  # the request counts at that point
    failed: int = 0
    tokens: int = 0  # the answered lines' input tokens at that point (the batch's usage)
    outcome: Literal["completed", "expired"] | None = None  # how its lines ended, once they have
    output_file_id: str | None = None  # the ids its results will get, chosen when it starts finalizing
    error_file_id: str | None = None


class BatchRecord(msgspec.Struct):
    batch: OpenAIBatch
    progress: BatchProgress
    created_ns: int
    output_expires_in: int | None = None  # OpenAI's output_expires_after: its output and error files' lifetime

    @property
    def done(self) -> bool:
        return self.batch.status in ("completed", "failed", "expired", "cancelled")


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BatchStore:
    """The records of every file and batch under ``root``, kept in memory and written through (one server per
    directory). Blocking file work: call the writing methods off the event loop."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("files", "batches", "uploads"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "uploads" / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"--batch-dir {root}: cannot write there ({exc.strerror or exc})") from None
        for left in (self.root / "uploads").iterdir():  # uploads cut off by a stop
            left.unlink()
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        for path in (self.root / "files").glob("file-*.json"):
            record = msgspec.json.decode(path.read_bytes(), type=FileRecord)
            if (self.root / "files" / f"{record.file.id}.jsonl").exists():
                self.files[record.file.id] = record
        for path in (self.root / "batches").glob("batch_*.json"):
            record = msgspec.json.decode(path.read_bytes(), type=BatchRecord)
            self.batches[record.batch.id] = record

    # ---------------------------------------------------------------- paths
    def _checked(self, kind: Literal["file", "batch"], object_id: str) -> str:
        if not _IDS[kind].match(object_id):
            raise ObjectNotFoundError(f"no {kind} with id '{object_id[:80]}'", param=f"{kind}_id")
        return object_id

    def content_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{self._checked('file', file_id)}.jsonl"

    def partial_path(self, batch_id: str, kind: Literal["output", "errors"]) -> Path:
        return self.root / "batches" / f"{self._checked('batch', batch_id)}.{kind}.jsonl"

    def upload_path(self) -> Path:
        return self.root / "uploads" / secrets.token_hex(12)

    # ---------------------------------------------------------------- files
    def file(self, file_id: str, param: str = "file_id") -> FileRecord:
        self.drop_expired()
        record = self.files.get(file_id)
        if record is None:
            raise ObjectNotFoundError(f"no file with id '{file_id[:80]}'", param=param)
        return record

    def drop_expired(self, now: float | None = None) -> list[str]:
        """Delete the files past their ``expires_at`` (an unfinished batch's input waits for its batch); their
        ids. Called before files are read or listed, so an expired file is never served."""
        now = time.time() if now is None else now
        reading = {b.batch.input_file_id for b in self.batches.values() if not b.done}
        expired = [file_id for file_id, record in self.files.items()
                   if record.file.expires_at is not None and record.file.expires_at <= now and file_id not in reading]
        for file_id in expired:
            (self.root / "files" / f"{file_id}.json").unlink(missing_ok=True)
            self.content_path(file_id).unlink(missing_ok=True)
            del self.files[file_id]
        return expired

    def add_file(self, source: Path, filename: str, purpose: Literal["batch", "batch_output"], lines: int,
                 file_id: str | None = None, expires_in: int | None = None) -> FileRecord:
        """Move ``source`` (in this directory) in as a file, under ``file_id`` or a new id; its record written
        (a repeat after a stop in between finds ``source`` moved already). ``expires_in``: seconds after its
        creation when it is deleted (OpenAI's ``expires_after``); None: kept until deleted."""
        file_id = file_id or new_id("file")
        target = self.content_path(file_id)
        if source.exists():
            with open(source, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(source, target)
        now = time.time_ns()
        created = now // 10**9
        record = FileRecord(OpenAIFileObject(id=file_id, bytes=target.stat().st_size, created_at=created,
                                             filename=filename, purpose=purpose,
                                             expires_at=None if expires_in is None else created + expires_in),
                            lines, now)
        _write_atomic(self.root / "files" / f"{file_id}.json", msgspec.json.encode(record))
        self.files[file_id] = record
        return record

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        for batch in self.batches.values():
            if batch.batch.input_file_id == file_id and not batch.done:
                raise RequestError(f"file '{file_id}' is the input of batch {batch.batch.id}, which is "
                                   f"{batch.batch.status}: cancel the batch first", param="file_id")
        (self.root / "files" / f"{file_id}.json").unlink()
        self.content_path(file_id).unlink(missing_ok=True)
        del self.files[file_id]

    # ---------------------------------------------------------------- batches
    def batch(self, batch_id: str) -> BatchRecord:
        record = self.batches.get(batch_id)
        if record is None:
            raise ObjectNotFoundError(f"no batch with id '{batch_id[:80]}'", param="batch_id")
        return record

    def write_batch(self, batch_id: str, data: bytes) -> None:
        """Write a batch's encoded record (encode it on the event loop: a snapshot) durably."""
        _write_atomic(self.root / "batches" / f"{self._checked('batch', batch_id)}.json", data)
