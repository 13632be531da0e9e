"""``create_app``: the Litestar application (routes, gateway, readiness, OpenAPI); ``load_models``."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Literal

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.enums import OpenAPIMediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from toolkit.errors import (
    AuthenticationError,
    ConfigError,
    NotReadyError,
    OverloadedError,
    RouteNotFoundError,
    ToolkitError,
)
from toolkit.runtime.async_embedder import AsyncEmbedder, BatchStats, Timings
from toolkit.runtime.embedder import Embedder
from toolkit.server.cohere_api import CohereController
from toolkit.server.decoding import ToolkitRequest
from toolkit.server.dispatch import BodyRoute, dispatch_body
from toolkit.server.errors import error_body, handle_exception
from toolkit.server.metrics import Metrics
from toolkit.server.models import ModelRegistry, ServedModel
from toolkit.server.openai_api import OpenAIController, OpenAIEmbeddingRequest, create_embeddings
from toolkit.server.pooling_api import PoolingController
from toolkit.server.rerank_api import RerankController
from toolkit.server.schema import document_schema, open_paths
from toolkit.server.tei_api import TEIController
from toolkit.server.telemetry import RequestRecord, Tracer, begin_request, end_request, note_work
from toolkit.server.vllm_api import (
    DetokenizeRequest,
    ScoreRequest,
    TokenizeRequest,
    VLLMController,
    create_score,
    create_text,
    create_tokens,
)
from toolkit.settings import RuntimeOptions, ServerOptions

__all__ = ["create_app", "load_models"]

log = logging.getLogger("toolkit.server")
INVOCATIONS = (  # SageMaker's entry point: the route a body's fields select
    BodyRoute(("input", "messages"), OpenAIEmbeddingRequest, create_embeddings),
    BodyRoute(("queries", "data_1", "text_1"), ScoreRequest, create_score),
    BodyRoute(("prompt",), TokenizeRequest, create_tokens),
    BodyRoute(("tokens",), DetokenizeRequest, create_text),
)
READY_TTL_S = 1.0  # one probe inference per second at most, however often /ready is polled


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
        self.open_paths = open_paths(options)  # no key needed (/metrics: on the metrics port only, when there is one)

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
        open_path = path.startswith(self.open_paths)
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
            self.metrics.request(self._route(path), record.status, time.perf_counter() - started)


class Readiness:
    """``/ready``'s probe: a dead worker is noticed at once; the probe inference runs at most once per
    ``ttl`` seconds, shared by concurrent callers (an open route must not be a way to load the model)."""

    def __init__(self, registry: ModelRegistry, ttl: float = READY_TTL_S) -> None:
        self.registry = registry
        self.ttl = ttl
        self._checked = float("-inf")
        self._problems: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def problems(self) -> dict[str, str]:
        dead = {name: s.engine.last_error or "the inference worker is not running"
                for name, s in self.registry.models.items() if not s.engine.alive}
        if dead:
            return dead
        async with self._lock:
            if time.monotonic() - self._checked >= self.ttl:
                self._problems = await self._probe()
                self._checked = time.monotonic()
            return self._problems

    async def _probe(self) -> dict[str, str]:
        problems = {}
        for name, served in self.registry.models.items():
            engine = served.engine
            try:
                probe = [engine.embedder.tokenizer.from_ids([engine.embedder.manifest.pad_token_id])]
                output = engine.embedder.session.output_names[0]
                await asyncio.wait_for(engine.run(probe, output, priority=-1), timeout=10)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure means not ready
                problems[name] = engine.last_error or f"{type(exc).__name__}: {exc}"
        return problems


class Health(msgspec.Struct):
    status: Literal["ok"]


class Ready(msgspec.Struct):
    status: Literal["ready"]
    models: list[str]


@post("/invocations", status_code=200, tags=["vLLM extras"],
      summary="SageMaker entry point: an embeddings, score, tokenize or detokenize body, told apart by its fields")
async def invocations(request: Request) -> Response:
    return await dispatch_body(request, INVOCATIONS, "`input` or `messages` (embeddings), `queries` (score), "
                                                     "`prompt` (tokenize) or `tokens` (detokenize)")


@get("/health", summary="Liveness", tags=["Operations"])
async def health() -> Health:
    return Health("ok")


@get("/ready", summary="Readiness: every model answers a probe inference (cached for 1 s)", tags=["Operations"])
async def ready(request: Request) -> Ready:
    problems = await request.app.state.readiness.problems()
    if problems:
        raise NotReadyError("not ready: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    return Ready("ready", list(request.app.state.registry.models))


@get("/metrics", summary="Prometheus metrics", tags=["Operations"], media_type="text/plain; version=0.0.4")
async def prometheus(request: Request) -> str:
    return request.app.state.metrics.render()


@get("/openapi.json", include_in_schema=False, media_type=OpenAPIMediaType.OPENAPI_JSON, sync_to_thread=False)
def openapi_json(request: Request) -> bytes:
    """The schema at the path client generators look for first (also at /docs/openapi.json); no API key."""
    return request.app.state.openapi_json


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

        def on_request(timings: Timings, tokens: int, name: str = name) -> None:  # every route's phases, in one place
            metrics.phases(name, timings.tokenize, timings.queue, timings.inference, tokens)
            note_work(timings.tokenize, timings.queue, timings.inference, tokens)  # the request's log line and spans

        served.append(ServedModel(name, AsyncEmbedder(embedder, on_batch=on_batch, on_request=on_request)))
    registry = ModelRegistry(served)
    metrics.queue_depth = lambda: sum(s.engine.queue_depth for s in registry.models.values())
    return registry


def _docs_plugin() -> tuple[SwaggerRenderPlugin, list]:
    """Swagger UI from the files the swagger-ui-bundle-v2 package ships: /docs works offline."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # not installed: Litestar's default (CDN) page
        return SwaggerRenderPlugin(), []
    assets = create_static_files_router(path="/docs/assets", directories=[Path(str(swagger_ui_path))],
                                        include_in_schema=False, name="docs-assets")
    plugin = SwaggerRenderPlugin(js_url="/docs/assets/swagger-ui-bundle.js", css_url="/docs/assets/swagger-ui.css",
                                 standalone_preset_js_url="/docs/assets/swagger-ui-standalone-preset.js",
                                 favicon="<link rel='icon' type='image/png' href='/docs/assets/favicon-32x32.png'>")
    return plugin, [assets]


def create_app(registry: ModelRegistry, options: ServerOptions | None = None, metrics: Metrics | None = None) -> Litestar:
    options = options or ServerOptions()
    metrics = metrics or Metrics()

    def close_engines() -> None:
        for served in registry.models.values():
            served.engine.close()

    docs, assets = _docs_plugin()
    routes: set[str] = set()
    tracer = Tracer(options.otlp_endpoint, options.otlp_service_name) if options.otlp_endpoint else None

    def gateway(app):
        return Gateway(app, options, metrics, routes, tracer)

    def close_tracer() -> None:
        if tracer is not None:
            tracer.close()

    cors = CORSConfig(allow_origins=list(options.cors_allow_origins), allow_methods=list(options.cors_allow_methods),
                      allow_headers=list(options.cors_allow_headers), allow_credentials=options.cors_allow_credentials,
                      expose_headers=["x-request-id", "x-total-time", "x-compute-tokens"]) \
        if options.cors_allow_origins else None

    app = Litestar(
        route_handlers=[OpenAIController, CohereController, VLLMController, TEIController, RerankController,
                        PoolingController, invocations, health, ready, prometheus, openapi_json, *assets],
        exception_handlers={Exception: handle_exception},
        middleware=[gateway],
        request_class=ToolkitRequest,
        request_max_body_size=options.payload_limit,
        on_shutdown=[close_engines, close_tracer],
        cors_config=cors,
        openapi_config=OpenAPIConfig(
            title="onnx-embed-toolkit", version="0.1.0", path="/docs", render_plugins=[docs],
            security=[{"BearerAuth": []}] if options.api_key else None,
            components=Components(security_schemes={"BearerAuth": SecurityScheme(
                type="http", scheme="bearer", description="Authorization: Bearer KEY (--api-key / TOOLKIT_API_KEY)")}),
        ),
        debug=False,
    )
    routes.update(path for route in app.routes for path in [route.path] if "{" not in path)
    document_schema(app, options)
    app.state.openapi_json = msgspec.json.encode(app.openapi_schema.to_schema())
    app.state.registry = registry
    app.state.options = options
    app.state.metrics = metrics
    app.state.readiness = Readiness(registry)
    app.state.started = int(time.time())
    return app
