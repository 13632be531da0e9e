"""``create_app``: the Litestar application (routes, gateway, readiness, OpenAPI); ``load_models``."""

from __future__ import annotations

import asyncio
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
    ConfigError,
    NotReadyError,
    RequestError,
)
from toolkit.runtime.async_embedder import AsyncEmbedder, BatchStats, Timings
from toolkit.runtime.embedder import Embedder
from toolkit.server.adapters_api import ADAPTER_ROUTES
from toolkit.server.batch_runner import BatchRunner
from toolkit.server.batch_store import BatchStore
from toolkit.server.batches_api import BatchesController, batch_api_off, forward_batch_api
from toolkit.server.classify_api import (
    ClassifyController,
    ClassifyRequest,
    TEIPredictRequest,
    create_classification,
    tei_predict,
)
from toolkit.server.cohere_api import CohereController
from toolkit.server.decoding import ToolkitRequest
from toolkit.server.dispatch import BodyRoute, convert_body, dispatch_body
from toolkit.server.errors import handle_exception
from toolkit.server.files_api import FilesController
from toolkit.server.gateway import Gateway
from toolkit.server.metrics import Metrics
from toolkit.server.models import ModelRegistry, ServedModel
from toolkit.server.openai_api import (
    OpenAIController,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    create_embeddings,
)
from toolkit.server.pooling_api import PoolingController
from toolkit.server.rerank_api import RERANK_BODIES, RerankController, TEIRerankRequest, tei_rerank
from toolkit.server.schema import document_schema
from toolkit.server.tei_api import (
    TEIController,
    TEIEmbedRequest,
    TEISimilarityRequest,
    TEITokensRequest,
    tei_embed,
    tei_embed_sparse,
    tei_similarity,
)
from toolkit.server.telemetry import Tracer, configure_logging, note_work
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

__all__ = ["check_ready", "create_app", "create_logged_app", "load_models", "open_model"]

log = logging.getLogger("toolkit.server")
async def embeddings_or_classify(request: Request, data: OpenAIEmbeddingRequest) -> Response:
    """/invocations' ``input``: embeddings, or on a text classifier (no embeddings) vLLM's classification, as
    vLLM dispatches by the served model's task."""
    served = request.app.state.registry.get(data.model)
    if served.embedder.text_classifier:
        body = {k: v for k, v in msgspec.to_builtins(data).items()
                if k in ClassifyRequest.__struct_fields__ and v is not None}
        return await create_classification(request, convert_body(body, ClassifyRequest))
    return await create_embeddings(request, data)


INVOCATIONS = (  # SageMaker's entry point: the route a body's fields select (vLLM's requests, then TEI's)
    BodyRoute(("input", "messages"), OpenAIEmbeddingRequest, embeddings_or_classify),
    BodyRoute(("queries", "data_1", "text_1"), ScoreRequest, create_score),
    BodyRoute(("prompt",), TokenizeRequest, create_tokens),
    BodyRoute(("tokens",), DetokenizeRequest, create_text),
    *RERANK_BODIES,  # query + documents (vLLM, Cohere) or query + texts (TEI)
)
READY_TTL_S = 1.0  # one probe inference per second at most, however often /ready is polled


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
    body = await request.json()
    if isinstance(body, dict) and "inputs" in body:
        return await tei_root(request)
    return await dispatch_body(request, INVOCATIONS, "`input` or `messages` (embeddings), `queries` (score), "
                                                     "`prompt` (tokenize), `tokens` (detokenize), `query` (rerank) "
                                                     "or `inputs` (TEI)")


async def tei_root(request: Request) -> Response:
    """TEI's ``POST /`` (and ``/invocations`` with ``inputs``): what the artifact does, as TEI dispatches it: a
    query with texts is ranked, ``inputs.source_sentence`` is compared with ``inputs.sentences``, a classifier
    predicts labels, other inputs are embedded (sparse for a SPLADE artifact)."""
    request.state.dialect = "tei"
    body = await request.json()
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with inputs (or query and texts)", param="inputs")
    if "query" in body:
        return await tei_rerank(request, convert_body(body, TEIRerankRequest))
    if isinstance(body.get("inputs"), dict):
        return await tei_similarity(request, convert_body(body, TEISimilarityRequest))
    emb = request.app.state.registry.get(body.get("model")).embedder
    tasks = emb.tasks
    if emb.text_classifier:  # TEI's /predict (a reranker's / ranks)
        return await tei_predict(request, convert_body(body, TEIPredictRequest))
    if "embed" in tasks:
        return await tei_embed(request, convert_body(body, TEIEmbedRequest))
    if "embed_sparse" in tasks:
        return await tei_embed_sparse(request, convert_body(body, TEITokensRequest))
    raise RequestError(f"this artifact answers {', '.join(tasks)}: POST / ranks a query against texts "
                       "({'query', 'texts'})", param="inputs")


@post("/", status_code=200, tags=["TEI"], summary="TEI's entry point: embed (sparse for SPLADE), rerank (query + "
                                                  "texts) or similarity (inputs.source_sentence), by body and model")
async def root(request: Request) -> Response:
    body = await request.json()
    if isinstance(body, dict) and "inputs" not in body and "query" not in body:
        return await dispatch_body(request, INVOCATIONS, "inputs (TEI), or a vLLM request body")
    return await tei_root(request)


@post("/embeddings", status_code=200, tags=["OpenAI"], summary="Create embeddings (OpenAI's route without /v1, "
                                                                "as TEI serves it)")
async def embeddings_unversioned(request: Request, data: OpenAIEmbeddingRequest) -> Response[OpenAIEmbeddingResponse]:
    return await create_embeddings(request, data)


@get(["/", "/ping"], summary="Liveness (TEI's and SageMaker's probes): 200, empty", tags=["Operations"],
     media_type="text/plain", sync_to_thread=False)
def ping() -> str:
    return ""


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


def open_model(path: Path, name: str | None, runtime: RuntimeOptions, metrics: Metrics) -> ServedModel:
    """Open one artifact and start its batching worker; ``name`` None: the card's name."""
    embedder = Embedder(path, options=runtime)
    name = name or embedder.card.name

    def on_batch(stats: BatchStats) -> None:
        metrics.batch(name, stats.size, stats.tokens, stats.seconds)

    def on_request(timings: Timings, tokens: int) -> None:  # every route's phases, in one place
        metrics.phases(name, timings.tokenize, timings.queue, timings.inference, tokens)
        note_work(timings.tokenize, timings.queue, timings.inference, tokens)  # the request's log line and spans

    return ServedModel(name, AsyncEmbedder(embedder, on_batch=on_batch, on_request=on_request))


def load_models(paths: list[Path], names: list[str], runtime: RuntimeOptions, metrics: Metrics) -> ModelRegistry:
    """Open every artifact (ConfigError on the first bad one) and start its batching worker."""
    if names and len(names) != len(paths):
        raise ConfigError(f"--served-model-name given {len(names)} times for {len(paths)} artifacts: give one per artifact")
    served: list[ServedModel] = []
    for i, path in enumerate(paths):
        model = open_model(path, names[i] if names else None, runtime, metrics)
        # each LoRA adapter is a model name of its own, on the base's batcher (vLLM serves a LoRA by its name)
        for entry in [model] + [ServedModel(adapter, model.engine.for_adapter(adapter), parent=model.name)
                                for adapter in list(model.embedder.adapters)]:
            if any(s.name == entry.name for s in served):
                model.engine.close()
                raise ConfigError(f"two models are served as '{entry.name}': set --served-model-name"
                                  + (" or rename the adapter" if entry.parent else ""))
            served.append(entry)
    registry = ModelRegistry(served)
    metrics.queue_depth = registry.queue_depth
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


def create_app(registry: ModelRegistry, options: ServerOptions | None = None, metrics: Metrics | None = None, *,
               batch_call=None, batch_forward=None) -> Litestar:
    """The app serving ``registry``. The Batch API, with ``options.batch_dir``: its store and runner here, each line
    answered in-process or by ``batch_call(endpoint, body, headers)`` (the batch deployment on Ray Serve); or,
    with ``batch_forward`` (a Ray Serve handle to that deployment), its requests handed there whole."""
    options = options or ServerOptions()
    metrics = metrics or Metrics()

    def close_engines() -> None:
        for served in registry.models.values():
            served.engine.close()

    # the Batch API here, or handed to the batch deployment (Ray Serve), or its paths a 404 saying how to turn it on
    store = BatchStore(options.batch_dir) if options.batch_dir and batch_forward is None else None
    batch_routes = [FilesController, BatchesController] if store else \
        [forward_batch_api] if batch_forward is not None else [batch_api_off]
    batch_routes += ADAPTER_ROUTES if options.allow_runtime_lora_updating else []  # vLLM's: absent unless allowed

    async def stop_batches() -> None:
        if store is not None:
            await app.state.batch_runner.stop()

    def start_batches() -> None:
        if store is not None:
            app.state.batch_runner.start()

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
                        PoolingController, ClassifyController, invocations, root, embeddings_unversioned, ping, health, ready, prometheus,
                        openapi_json, *batch_routes, *assets],
        exception_handlers={Exception: handle_exception},
        middleware=[gateway],
        request_class=ToolkitRequest,
        request_max_body_size=options.payload_limit,
        on_startup=[start_batches],
        on_shutdown=[stop_batches, close_engines, close_tracer],
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
    if store is not None:
        app.state.batch_store, app.state.batch_runner = store, BatchRunner(app, store, options, call=batch_call)
    app.state.batch_forward = batch_forward
    return app


def create_logged_app(registry: ModelRegistry, options: ServerOptions, metrics: Metrics, **batches) -> Litestar:
    """``create_app``, then the process's logging configured again: Litestar configures its own logger while
    building the app, and every line must go through one handler (one process, or each Ray Serve replica)."""
    app = create_app(registry, options, metrics, **batches)
    configure_logging(options.log_level, options.json_output, spans=not options.disable_spans)
    return app


async def check_ready(app: Litestar) -> None:
    """RuntimeError naming each model's problem unless ``/ready`` would answer 200 (Ray Serve's ``check_health``:
    raising marks a replica unhealthy, and Ray Serve replaces it)."""
    problems = await app.state.readiness.problems()
    if problems:
        raise RuntimeError("; ".join(f"{name}: {why}" for name, why in problems.items()))

