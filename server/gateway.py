"""The ASGI gateway in front of every route: the API key (401), the in-flight limit (429), the metrics port,
per-route metrics, each request's telemetry record (log line, spans, ``x-request-id``), and a 503 in the API's
shape for a request cancelled by shutdown past the grace period."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from toolkit.errors import (
    AuthenticationError,
    NotReadyError,
    OverloadedError,
    RouteNotFoundError,
    ToolkitError,
)
from toolkit.server.errors import error_body
from toolkit.server.metrics import Metrics
from toolkit.server.schema import is_open
from toolkit.server.telemetry import RequestRecord, Tracer, begin_request, end_request
from toolkit.settings import ServerOptions

__all__ = ["BATCH_SCOPE_KEY", "Gateway"]

BATCH_SCOPE_KEY = "toolkit.batch"  # set in the ASGI scope of a Batch API line's in-process call

log = logging.getLogger("toolkit.server")


class Gateway:
    """ASGI middleware: API key (401), in-flight limit (429), per-route metrics, and a 503 in the
    API's shape for a request cancelled by shutdown past the grace period."""

    def __init__(self, app, options: ServerOptions, metrics: Metrics, routes: set[str],
                 tracer: Tracer | None = None) -> None:
        self.app = app
        self.options = options
        self.metrics = metrics
        self.routes = routes  # metric labels: known routes only (an unbounded label set is a memory leak)
        self.in_flight = 0
        self._key = options.api_key.encode() if options.api_key else None
        self.tracer = tracer

    async def _reject(self, send, path: str, exc: ToolkitError, headers: list | None = None) -> None:
        status, body = error_body(path, exc.status_code, exc.message, exc.error_type, exc.param, exc=exc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.request(self._route(path), status, 0.0)

    def _route(self, path: str) -> str:
        return path if path in self.routes else "(unmatched)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record, token = begin_request(scope)
        if self.tracer is not None:
            self.tracer.start(record, scope)
        request_id = (b"x-request-id", record.id.encode())

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), request_id]}
            await send(message)

        try:
            await self._serve(scope, receive, capture, record)
        finally:
            end_request(record, token, self.tracer)

    async def _serve(self, scope, receive, send, record: RequestRecord) -> None:
        path = scope["path"]
        server = scope.get("server") or ("", None)
        if self.options.prometheus_port is not None and server[1] == self.options.prometheus_port:
            if path != "/metrics":  # the metrics port serves nothing else
                return await self._reject(send, path, RouteNotFoundError(f"{path}: this port serves /metrics only"))
            return await self.app(scope, receive, send)
        open_path = is_open(scope.get("method", ""), path, self.options)
        if self._key is not None and not open_path:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self._key):
                return await self._reject(send, path, AuthenticationError(
                    "missing or invalid API key (Authorization: Bearer ...)"), [(b"www-authenticate", b"Bearer")])
        if self.in_flight >= self.options.max_concurrent_requests and not open_path:
            error = OverloadedError(f"more than {self.options.max_concurrent_requests} requests in flight; retry shortly")
            return await self._reject(send, path, error, [(b"retry-after", str(error.retry_after_s).encode())])
        started_response = False

        async def capture(message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            await send(message)

        # a Batch API line (server.batch_runner) is counted apart: its time in the queue is not an online latency
        route = f"{path} (batch)" if scope.get(BATCH_SCOPE_KEY) else self._route(path)
        self.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the shutdown grace period ends
            if not started_response:
                await self._reject(send, path, NotReadyError(
                    "the server is shutting down and this request did not finish within its grace period; retry"))
            log.warning("%s %s cancelled by shutdown", scope.get("method"), path)
        finally:
            self.in_flight -= 1
            self.metrics.request(route, record.status, time.perf_counter() - started)
