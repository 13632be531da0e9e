"""``create_app`` and ``run_server``: the Litestar application and its process."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from pathlib import Path

from litestar import Litestar, Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from toolkit.errors import ConfigError, NotReadyError
from toolkit.runtime.async_embedder import AsyncEmbedder, BatchStats
from toolkit.runtime.embedder import Embedder
from toolkit.server.cohere_api import CohereController
from toolkit.server.errors import error_body, handle_exception
from toolkit.server.metrics import Metrics
from toolkit.server.models import ModelRegistry, ServedModel
from toolkit.server.openai_api import OpenAIController
from toolkit.server.vllm_api import VLLMController
from toolkit.settings import RuntimeOptions, ServerOptions

__all__ = ["create_app", "load_models", "run_server"]

log = logging.getLogger("toolkit.server")
OPEN_PATHS = ("/health", "/ready", "/metrics")


class Gateway:
    """ASGI middleware: API key, in-flight limit (429) and per-route metrics."""

    def __init__(self, app, options: ServerOptions, metrics: Metrics) -> None:
        self.app = app
        self.options = options
        self.metrics = metrics
        self.in_flight = 0
        self._key = options.api_key.encode() if options.api_key else None

    async def _reject(self, send, path: str, status: int, message: str, headers: list | None = None) -> None:
        body = error_body(path, status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.request(path, status, 0.0)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self._key is not None and not path.startswith(OPEN_PATHS):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self._key):
                return await self._reject(send, path, 401, "missing or invalid API key (Authorization: Bearer ...)",
                                          [(b"www-authenticate", b"Bearer")])
        if self.in_flight >= self.options.max_concurrent_requests and not path.startswith(OPEN_PATHS):
            return await self._reject(send, path, 429, "too many concurrent requests; retry shortly", [(b"retry-after", b"1")])
        status = 500

        async def capture(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, receive, capture)
        finally:
            self.in_flight -= 1
            self.metrics.request(path, status, time.perf_counter() - started)


@get("/health", summary="Liveness", tags=["Operations"])
async def health() -> dict:
    return {"status": "ok"}


@get("/ready", summary="Readiness: every model answers a probe inference", tags=["Operations"])
async def ready(request: Request) -> Response:
    problems = {}
    for name, served in request.app.state.registry.models.items():
        engine = served.engine
        try:
            probe = [engine.embedder.tokenizer.from_ids([engine.embedder.manifest.pad_token_id])]
            output = engine.embedder.session.output_names[0]
            await asyncio.wait_for(engine.run(probe, output, priority=-1), timeout=10)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure means not ready
            problems[name] = engine.last_error or f"{type(exc).__name__}: {exc}"
    if problems:
        raise NotReadyError("not ready: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    return Response({"status": "ready", "models": list(request.app.state.registry.models)})


@get("/metrics", summary="Prometheus metrics", tags=["Operations"], media_type="text/plain; version=0.0.4")
async def prometheus(request: Request) -> str:
    return request.app.state.metrics.render()


def load_models(paths: list[Path], names: list[str], runtime: RuntimeOptions, metrics: Metrics) -> ModelRegistry:
    """Open every artifact (ConfigError on the first bad one) and start its batching worker."""
    if names and len(names) != len(paths):
        raise ConfigError(f"--served-model-name given {len(names)} times for {len(paths)} artifacts: give one per artifact")
    served = []
    for i, path in enumerate(paths):
        embedder = Embedder(path, options=runtime)
        name = names[i] if names else embedder.card.name
        if any(s.name == name for s in served):
            raise ConfigError(f"two artifacts are served as '{name}': set --served-model-name")

        def on_batch(stats: BatchStats, name: str = name) -> None:
            metrics.batch(name, stats.size, stats.tokens, stats.seconds)

        served.append(ServedModel(name, AsyncEmbedder(embedder, on_batch=on_batch)))
    registry = ModelRegistry(served)
    metrics.queue_depth = lambda: sum(s.engine.queue_depth for s in registry.models.values())
    return registry


def create_app(registry: ModelRegistry, options: ServerOptions | None = None, metrics: Metrics | None = None) -> Litestar:
    options = options or ServerOptions()
    metrics = metrics or Metrics()

    def close_engines() -> None:
        for served in registry.models.values():
            served.engine.close()

    def gateway(app):
        return Gateway(app, options, metrics)

    app = Litestar(
        route_handlers=[OpenAIController, CohereController, VLLMController, health, ready, prometheus],
        exception_handlers={Exception: handle_exception},
        middleware=[gateway],
        request_max_body_size=options.payload_limit,
        on_shutdown=[close_engines],
        openapi_config=OpenAPIConfig(title="onnx-embed-toolkit", version="0.1.0", path="/docs",
                                     render_plugins=[SwaggerRenderPlugin()]),
        debug=False,
    )
    app.state.registry = registry
    app.state.options = options
    app.state.metrics = metrics
    app.state.started = int(time.time())
    return app


def _release_freed_memory() -> None:
    """Hand the heap that model loading freed (the parsed ONNX protobuf) back to the OS.

    glibc keeps freed memory in its arenas; malloc_trim returns it: -21 MiB RSS for MiniLM (measured).
    """
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def run_server(paths: list[Path], names: list[str], options: ServerOptions, runtime: RuntimeOptions) -> int:
    """Load, then serve until SIGINT / SIGTERM (in-flight requests finish); returns the exit code."""
    import uvicorn

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    metrics = Metrics()
    registry = load_models(paths, names, runtime, metrics)
    app = create_app(registry, options, metrics)
    for name, served in registry.models.items():
        log.info("serving %s (%s, %s) on %s", name, served.embedder.path.name, served.embedder.device.value,
                 f"http://{options.host}:{options.port}")
    log.info("models loaded in %.2f s", time.perf_counter() - started)
    _release_freed_memory()
    # uvicorn finishes in-flight requests on SIGTERM / SIGINT, then re-raises the signal
    # to the previous handler: make that a no-op so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level, access_log=False,
                timeout_graceful_shutdown=30)
    return 0
