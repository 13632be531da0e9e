"""Many models on one Ray Serve deployment: Ray Serve's model multiplexing, picked by the request's ``model``.

Ray Serve's proxy routes a multiplexed request by its ``serve_multiplexed_model_id`` header, and OpenAI,
Cohere and vLLM clients name the model in the body. So a small ingress (``_Router``) reads the body's
``model`` and hands the request to the ``_Models`` deployment with that id: Ray routes it to a replica that
already holds the model where one does, and ``@serve.multiplexed`` opens it on the chosen replica otherwise,
closing the least recently used one past ``models_per_replica``. Each ``_Models`` replica runs the same
Litestar app as one process, over a registry that knows every served name and holds the open ones: routes,
dialects, the API key, limits and errors behave as they do there (an unknown model is the same 404 listing
the served names). A model being closed finishes the requests already inside it first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from toolkit.server.asgi import asgi_call
from toolkit.settings import RuntimeOptions, ServerOptions

__all__ = ["build_multiplexed"]

ROUTER = "toolkit-router"


class _Named(msgspec.Struct):
    model: str | None = None


def _model_of(body: bytes) -> str | None:
    """The ``model`` of a JSON object body; None for any other body (the app answers it in its own words)."""
    try:
        return msgspec.json.decode(body, type=_Named).model
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):  # invalid UTF-8, nested too deep
        return None


class _Open:
    """A model open on a replica. Ray Serve awaits its ``__del__`` when multiplexing closes it (LRU): an
    instance attribute, so that the garbage collector, which looks on the class, finds none to call."""

    def __init__(self, replica: _ModelsBase, name: str, served) -> None:
        self.name = name

        async def close() -> None:
            await replica.close_model(name, served)

        self.__del__ = close


class _ModelsBase:
    """A replica of the multiplexed deployment: the Litestar app over a registry of every served name, models
    opened on demand (``_models_class`` adds the ``@serve.multiplexed`` loader, sized at build time)."""

    def __init__(self, paths: dict[str, str], server: ServerOptions, runtime: RuntimeOptions) -> None:
        from toolkit.server.app import create_logged_app
        from toolkit.server.metrics import Metrics
        from toolkit.server.models import ModelRegistry
        from toolkit.server.telemetry import configure_logging

        configure_logging(server.log_level, server.json_output, spans=not server.disable_spans)
        self._paths, self._runtime, self._grace = paths, runtime, float(server.shutdown_grace_s)
        self._metrics = Metrics()
        self.registry = ModelRegistry([], names=list(paths))
        self._metrics.queue_depth = self.registry.queue_depth
        self._app = create_logged_app(self.registry, server, self._metrics)
        self._inside: dict[str, int] = {}  # requests inside the app per model

    async def open_model(self, name: str) -> _Open:
        from toolkit.server.app import open_model
        from toolkit.server.remote_artifacts import local_path

        path = await asyncio.to_thread(local_path, self._paths[name])
        served = await asyncio.to_thread(open_model, path, name, self._runtime, self._metrics)
        self.registry.models[name] = served
        return _Open(self, name, served)

    async def close_model(self, name: str, served) -> None:
        """Close ``served`` once the requests inside the app for ``name`` are done (within the shutdown grace);
        it stays in the registry until then, so a request that passed ``load`` still finds it. A request that
        comes meanwhile reopens the model (Ray Serve has dropped it already): that newer engine is kept."""
        deadline = time.monotonic() + self._grace
        while self._inside.get(name, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.registry.models.get(name) is served:
            del self.registry.models[name]
        await asyncio.to_thread(served.engine.close)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes, client) -> tuple:
        from ray import serve

        name = serve.get_multiplexed_model_id()
        if name:
            await self.load(name)
        self._inside[name] = self._inside.get(name, 0) + 1
        try:
            return await asgi_call(self._app, method, path, query=query, headers=headers, body=body, client=client)
        finally:
            self._inside[name] -= 1

    async def check_health(self) -> None:  # Ray Serve's health check: the app's readiness probe
        from toolkit.server.app import check_ready

        await check_ready(self._app)

    def __del__(self) -> None:
        for served in list(self.registry.models.values()):
            served.engine.close()


def _models_class(per_replica: int) -> type:
    from ray import serve

    class _Models(_ModelsBase):
        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def load(self, name: str) -> _Open:
            return await self.open_model(name)

    return _Models


class _Router:
    """The ingress: reads a body's ``model`` (within the payload limit) and forwards the request to the model
    deployment with that multiplexed id; requests that name no served model go to any replica, whose app
    answers them (the 404 listing the served names, a 400 for a body that is not JSON, ...)."""

    def __init__(self, models, names: list[str], payload_limit: int) -> None:
        self._models, self._names, self._limit = models, set(names), payload_limit

    def __serve_build_asgi_app__(self):
        async def asgi(scope, receive, send) -> None:  # a plain function: uvicorn takes a bound method for ASGI 2
            await self._route(scope, receive, send)

        return asgi

    async def _route(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more and len(body) <= self._limit:  # past the limit: the app's 413 (from content-length or size)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        name = _model_of(body) if scope["method"] == "POST" else None
        handle = self._models.options(multiplexed_model_id=name) if name in self._names else self._models
        status, headers, payload = await handle.forward.remote(
            scope["method"], scope["path"], scope.get("query_string", b""), list(scope.get("headers", [])), body,
            scope.get("client"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def build_multiplexed(paths: dict[str, str], server: ServerOptions, runtime: RuntimeOptions,
                      options: dict[str, Any], per_replica: int):
    """The application: the router (one replica, no CPU reserved) bound to the model deployment (``options``:
    its replicas, resources, limits and health checks, as ``build_app`` sets them)."""
    from ray import serve

    models = serve.deployment(**options)(_models_class(per_replica)).bind(paths, server, runtime)
    router = serve.deployment(name=ROUTER, num_replicas=1, ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=options["max_ongoing_requests"])(serve.ingress()(_Router))
    return router.bind(models, list(paths), server.payload_limit)
