"""``BatchRunner``: runs the Batch API's batches in the server's process, behind its online requests.

Each batch is an asyncio task. Its lines go through the app itself, in-process (an ASGI call of the batch's
endpoint with the line's body, the gateway included), so a line is answered by the very code an online request
meets: same validation, same answer, same error shape (metrics count them under their own route label). The task
sets ``queue_lane`` so every input of its lines queues behind every online request in the batcher, which takes
them in small batches of their own, and keeps at most ``batch_concurrency`` lines (``INPUT_BUDGET`` inputs) in
flight.

Progress is committed every ``COMMIT_S``: the output and error files are fsynced, then the batch's record
(input lines consumed, input offset, the two files' sizes, the counts) is written atomically. A server that
restarts truncates both files to the committed sizes and goes on from the committed input offset, so a line
answered after the last commit is answered again once, never twice, and none is lost.

Status: validating (duplicate ``custom_id`` fails the batch, as OpenAI's does) -> in_progress -> finalizing ->
completed, or expired past ``expires_at``; cancel: cancelling -> cancelled, keeping what was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from toolkit.runtime.async_embedder import BATCH_LANE, queue_lane
from toolkit.server.asgi import asgi_call
from toolkit.server.batch_store import (
    BatchRecord,
    BatchStore,
    OpenAIBatchError,
    OpenAIBatchErrors,
    new_id,
)
from toolkit.server.gateway import BATCH_SCOPE_KEY
from toolkit.settings import ServerOptions

__all__ = ["BatchRunner", "call_route"]

log = logging.getLogger("toolkit.server")

INPUT_BUDGET = 512  # a batch's inputs in flight (a list counts its items), a share of the batcher's --max-queue
COMMIT_S = 0.25  # progress is made durable this often (and at the end)
TRANSIENT = (429, 503)  # overloaded or not ready: the line is tried again, not failed
RETRIES = 60  # ... this many times (about a minute), then the answer stands
MAX_ERRORS = 20  # validation errors listed on a failed batch


class _Line(msgspec.Struct):
    custom_id: Any = None


def _parse(raw: bytes) -> tuple[Any, int]:
    """(the line's JSON or the exception decoding it, its inputs: the longest list in its body, at least 1)."""
    try:
        line = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        return exc, 1
    body = line.get("body") if isinstance(line, dict) else None
    return line, max([len(v) for v in body.values() if isinstance(v, list)] if isinstance(body, dict) else [], default=1)


async def call_route(app, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bytes]:
    """(status, headers, body) of ``POST path`` with a JSON ``body``, answered by the ASGI ``app`` in-process."""
    status, answer_headers, content = await asgi_call(
        app, "POST", path, body=body, scope={BATCH_SCOPE_KEY: True, "server": None},
        headers=[(b"host", b"batch"), (b"content-type", b"application/json"),
                 (b"content-length", str(len(body)).encode()), *headers])
    return status, dict(answer_headers), content


def _error_line(request_id: str, custom_id: Any, code: str, message: str) -> bytes:
    custom = custom_id if isinstance(custom_id, str) else None
    return msgspec.json.encode({"id": request_id, "custom_id": custom, "response": None,
                                "error": {"code": code, "message": message}}) + b"\n"


def _scan(path, limit: int) -> tuple[int, list[OpenAIBatchError]]:
    """(requests, validation errors) of an input file: blank lines are no request; a ``custom_id`` seen twice is
    an error (a malformed line is left to be that line's error)."""
    seen: dict[str, int] = {}
    errors: list[OpenAIBatchError] = []
    total = 0
    decoder = msgspec.json.Decoder(_Line)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                custom_id = decoder.decode(raw).custom_id
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
                continue
            if not isinstance(custom_id, str):
                continue
            if custom_id in seen and len(errors) < MAX_ERRORS:
                errors.append(OpenAIBatchError(
                    "duplicate_custom_id", f"custom_id '{custom_id[:200]}' is on line {seen[custom_id]} and line "
                    f"{number}: each request of a batch needs its own", "custom_id", number))
            seen.setdefault(custom_id, number)
    if total == 0:
        errors.append(OpenAIBatchError("empty_file", "the input file has no request lines", "input_file_id"))
    elif total > limit:
        errors.append(OpenAIBatchError("too_many_requests", f"the input file has {total} requests; a batch may "
                                       f"have {limit} (--batch-max-requests)", "input_file_id"))
    return total, errors


class BatchRunner:
    """Every batch's task, started by ``submit`` (and ``start`` for the ones a stopped server left)."""

    def __init__(self, app, store: BatchStore, options: ServerOptions, *, call=None) -> None:
        """``call(endpoint, body, headers) -> (status, headers, content)`` answers a line: by default the online
        route of ``app`` in this process (Ray Serve's batch deployment sends it to the model replicas)."""
        self.app = app
        self.store = store
        self.options = options
        self._call = call or (lambda endpoint, body, headers: call_route(app, endpoint, body, headers))
        self.tasks: dict[str, asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopping = False
        self._headers = [(b"authorization", b"Bearer " + options.api_key.encode())] if options.api_key else []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Resume every batch a stopped server left unfinished."""
        for record in self.store.batches.values():
            if not record.done:
                counts = record.batch.request_counts
                counts.completed, counts.failed = record.progress.completed, record.progress.failed
                log.info("batch %s: resuming (%s, %d lines done)", record.batch.id, record.batch.status,
                         record.progress.line)
                self.submit(record)

    def submit(self, record: BatchRecord) -> None:
        self.tasks[record.batch.id] = asyncio.create_task(self._run(record), name=f"toolkit-{record.batch.id}")

    async def stop(self) -> None:
        """Stop every task where it is: the committed progress is where a restart goes on."""
        self._stopping = True
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def save(self, record: BatchRecord, **progress) -> None:
        """Write the record durably, with ``progress`` fields set first; one write at a time per batch, each a
        snapshot taken when its turn comes."""
        async with self._locks.setdefault(record.batch.id, asyncio.Lock()):
            for name, value in progress.items():
                setattr(record.progress, name, value)
            await asyncio.to_thread(self.store.write_batch, record.batch.id, msgspec.json.encode(record))

    async def cancel(self, record: BatchRecord) -> None:
        """Ask a batch to stop: its lines in flight finish, then it is finalized as cancelled."""
        batch = record.batch
        batch.status, batch.cancelling_at = "cancelling", int(time.time())
        await self.save(record)
        if record.batch.id not in self.tasks or self.tasks[record.batch.id].done():
            self.submit(record)

    # ---------------------------------------------------------------- the task
    async def _run(self, record: BatchRecord) -> None:
        queue_lane.set(BATCH_LANE)
        batch = record.batch
        started = time.monotonic()
        try:
            if batch.status == "validating":
                await self._validate(record)
            if batch.status == "in_progress":
                await self._execute(record)
            if batch.status in ("finalizing", "cancelling"):
                await self._finalize(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a batch that cannot go on fails, the server stays up
            log.exception("batch %s failed", batch.id)
            batch.status, batch.failed_at = "failed", int(time.time())
            batch.errors = OpenAIBatchErrors([OpenAIBatchError("internal_error", f"{type(exc).__name__}: {exc}")])
            await self.save(record)
            return
        counts = batch.request_counts
        log.info("batch %s: %s, %d answered, %d failed of %d (%.1f s)", batch.id, batch.status, counts.completed,
                 counts.failed, counts.total, time.monotonic() - started)

    async def _validate(self, record: BatchRecord) -> None:
        batch = record.batch
        path = self.store.content_path(batch.input_file_id)
        total, errors = await asyncio.to_thread(_scan, path, self.options.batch_max_requests)
        now = int(time.time())
        if batch.status != "validating":  # cancelled meanwhile
            return
        if errors:
            batch.status, batch.failed_at, batch.errors = "failed", now, OpenAIBatchErrors(errors)
        else:
            batch.status, batch.in_progress_at, batch.request_counts.total = "in_progress", now, total
        await self.save(record)

    async def _execute(self, record: BatchRecord) -> None:
        batch, progress = record.batch, record.progress
        partial = {kind: self.store.partial_path(batch.id, kind) for kind in ("output", "errors")}
        for kind, size in (("output", progress.output_bytes), ("errors", progress.error_bytes)):
            with open(partial[kind], "ab"):
                pass
            os.truncate(partial[kind], size)  # what a killed server wrote after its last commit goes
        done = {"line": progress.line, "offset": progress.offset, "output_bytes": progress.output_bytes,
                "error_bytes": progress.error_bytes, "completed": progress.completed, "failed": progress.failed,
                "tokens": progress.tokens}
        pending: deque[tuple[int, int, asyncio.Task | None, int]] = deque()  # (line, offset after it, task, inputs)
        with open(self.store.content_path(batch.input_file_id), "rb") as source, \
                open(partial["output"], "ab") as output, open(partial["errors"], "ab") as errors:

            async def commit() -> None:
                output.flush()
                errors.flush()
                await asyncio.to_thread(lambda: (os.fsync(output.fileno()), os.fsync(errors.fileno())))
                await self.save(record, **done)

            source.seek(progress.offset)
            number, offset, eof, last = progress.line, progress.offset, False, time.monotonic()
            held, in_flight = None, 0  # a line read but not started (over the input budget); inputs in flight
            try:
                while True:
                    halted = batch.status == "cancelling" or time.time() >= batch.expires_at
                    while not (eof or halted) and len(pending) < self.options.batch_concurrency:
                        if held is None:
                            raw = source.readline()
                            if not raw:
                                eof = True
                                break
                            number, offset = number + 1, offset + len(raw)
                            held = (number, offset, _parse(raw) if raw.strip() else None)
                        line, end, parsed = held
                        inputs = parsed[1] if parsed else 0
                        if pending and in_flight + inputs > INPUT_BUDGET:
                            break
                        task = asyncio.create_task(self._answer(batch.endpoint, parsed[0], line)) if parsed else None
                        pending.append((line, end, task, inputs))
                        held, in_flight = None, in_flight + inputs
                    if not pending:
                        break
                    line, end, task, inputs = pending.popleft()
                    in_flight -= inputs
                    if task is not None:
                        ok, data, tokens = await task
                        (output if ok else errors).write(data)
                        done["output_bytes" if ok else "error_bytes"] += len(data)
                        done["completed" if ok else "failed"] += 1
                        done["tokens"] += tokens
                        batch.request_counts.completed, batch.request_counts.failed = done["completed"], done["failed"]
                        batch.usage.input_tokens = batch.usage.total_tokens = done["tokens"]
                    done["line"], done["offset"] = line, end
                    if time.monotonic() - last >= COMMIT_S:
                        await commit()
                        last = time.monotonic()
                await commit()
            finally:
                for _, _, task, _ in pending:
                    if task is not None:
                        task.cancel()
        if batch.status == "in_progress":
            batch.status, batch.finalizing_at = "finalizing", int(time.time())
            await self.save(record, outcome="completed" if eof else "expired")

    async def _answer(self, endpoint: str, line: Any, number: int) -> tuple[bool, bytes, int]:
        """(answered with a 2xx, the line for the output or error file, the input tokens it was billed) of one
        input line (its JSON, or the exception decoding it)."""
        ok, content, data = await self._respond(endpoint, line, number)
        return ok, data, _billed_tokens(content) if ok else 0

    async def _respond(self, endpoint: str, line: Any, number: int) -> tuple[bool, bytes, bytes]:
        """(answered with a 2xx, the route's answer body (empty for a line refused before the route), the line
        for the output or error file)."""
        key = uuid.uuid4().hex
        line_id = f"batch_req_{key}"
        if isinstance(line, Exception):
            return False, b"", _error_line(line_id, None, "invalid_json_line", f"line {number} is not valid JSON: {line}")
        if not isinstance(line, dict):
            return False, b"", _error_line(line_id, None, "invalid_json_line", f"line {number} is not a JSON object "
                                           "with custom_id, method, url and body")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return False, b"", _error_line(line_id, None, "missing_custom_id", f"line {number} has no custom_id (a string)")
        if line.get("method") != "POST":
            return False, b"", _error_line(line_id, custom_id, "invalid_method",
                                           f"line {number}: method must be POST, got {line.get('method')!r}")
        if line.get("url") != endpoint:
            return False, b"", _error_line(line_id, custom_id, "invalid_url", f"line {number}: url {line.get('url')!r} is "
                                           f"not this batch's endpoint ({endpoint}); every line goes to the batch's endpoint")
        if not isinstance(line.get("body"), dict):
            return False, b"", _error_line(line_id, custom_id, "invalid_body",
                                           f"line {number}: body must be a JSON object (the request's body)")
        body = msgspec.json.encode(line["body"])
        headers = [*self._headers, (b"x-request-id", f"req_{key}".encode())]
        for attempt in range(RETRIES):
            status, answer_headers, content = await self._call(endpoint, body, headers)
            if self._stopping:  # the gateway answers a request cut off by shutdown: that is no answer
                raise asyncio.CancelledError
            if status not in TRANSIENT or attempt == RETRIES - 1:
                break
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
        if not answer_headers.get(b"content-type", b"").startswith(b"application/json"):
            return False, b"", _error_line(line_id, custom_id, "unsupported_response", f"line {number}: the answer is not "
                                           "JSON (encoding_format bytes / bytes_only): ask for float or base64 in a batch")
        request_id = answer_headers.get(b"x-request-id", f"req_{key}".encode())
        head = b'{"id":"%s","custom_id":%s,"response":{"status_code":%d,"request_id":"%s","body":' % (
            line_id.encode(), msgspec.json.encode(custom_id), status, request_id)
        return 200 <= status < 300, content, head + content + b'},"error":null}\n'

    async def _finalize(self, record: BatchRecord) -> None:
        """The partial files become the batch's output and error files (each only when it has lines); a repeat
        after a stop in the middle finds what was done and does the rest."""
        batch, progress = record.batch, record.progress
        if progress.output_file_id is None and progress.error_file_id is None:
            await self.save(record, output_file_id=new_id("file") if progress.output_bytes else None,
                            error_file_id=new_id("file") if progress.error_bytes else None)
        for kind, file_id, size, lines in (("output", progress.output_file_id, progress.output_bytes, progress.completed),
                                           ("errors", progress.error_file_id, progress.error_bytes, progress.failed)):
            path = self.store.partial_path(batch.id, kind)
            if file_id is not None and file_id not in self.store.files:
                def move(path=path, size=size, kind=kind, file_id=file_id, lines=lines):
                    if path.exists():
                        os.truncate(path, size)
                    self.store.add_file(path, f"{batch.id}_{kind}.jsonl", "batch_output", lines, file_id,
                                        record.output_expires_in)

                await asyncio.to_thread(move)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        now = int(time.time())
        batch.output_file_id, batch.error_file_id = progress.output_file_id, progress.error_file_id
        batch.request_counts.completed, batch.request_counts.failed = progress.completed, progress.failed
        batch.usage.input_tokens = batch.usage.total_tokens = progress.tokens
        if batch.status == "cancelling":
            batch.status, batch.cancelled_at = "cancelled", now
        elif progress.outcome == "expired":
            batch.status, batch.expired_at = "expired", now
        else:
            batch.status, batch.completed_at = "completed", now
        await self.save(record)


class _Billed(msgspec.Struct):
    input_tokens: int = 0


class _Meta(msgspec.Struct):
    billed_units: _Billed | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0


class _Counted(msgspec.Struct):
    usage: _Usage | None = None  # OpenAI's and vLLM's answers
    meta: _Meta | None = None  # Cohere's


def _billed_tokens(content: bytes) -> int:
    """The input tokens an answer body reports (``usage.prompt_tokens``, or Cohere's ``meta.billed_units``)."""
    try:
        counted = msgspec.json.decode(content, type=_Counted)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    if counted.usage is not None:
        return counted.usage.prompt_tokens
    if counted.meta is not None and counted.meta.billed_units is not None:
        return counted.meta.billed_units.input_tokens
    return 0
