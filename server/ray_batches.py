"""The Batch API on Ray Serve: one deployment holds the files and batches; the replicas answer the lines.

``toolkit serve --engine ray --batch-dir DIR`` adds a deployment of one replica, ``toolkit-batches``, beside the
model replicas. It owns ``DIR`` (the store and the batch runner, as ``toolkit serve`` runs them in one process),
so there is one record of every file and batch whichever replica a request reaches: each model replica hands the
requests for ``/v1/files`` and ``/v1/batches`` to it whole (``batches_api.forward_batch_api``). A batch's lines go back to the
model replicas through Ray Serve's handle (``answer_line``): Ray spreads them over the replicas, and each line
meets the very route an online request meets, in the batch lane of that replica's batcher (behind every online
request there). A restarted batch deployment resumes its batches from ``DIR`` as a restarted server does.
``DIR`` must be writable where that one replica runs: one machine, or a filesystem the nodes share.
"""

from __future__ import annotations

from typing import Any

from toolkit.server.asgi import asgi_call

__all__ = ["BATCH_DEPLOYMENT", "BatchApi", "answer_line"]

BATCH_DEPLOYMENT = "toolkit-batches"


async def answer_line(app, endpoint: str, body: bytes, headers: list) -> tuple[int, dict, bytes]:
    """One batch line answered by this replica's ``app``, its inputs in the batch lane of the batcher."""
    from toolkit.runtime.async_embedder import BATCH_LANE, queue_lane
    from toolkit.server.batch_runner import call_route

    queue_lane.set(BATCH_LANE)  # this task's own context: online requests of the replica keep their lane
    return await call_route(app, endpoint, body, headers)


class BatchApi:
    """The batch deployment (one replica): the store and the runner over an app of the Batch API's routes only,
    its lines sent to the model deployment of the same Ray Serve application."""

    def __init__(self, server, models: str) -> None:
        """``models``: the name of the model deployment in this Ray Serve application (where the lines go)."""
        from toolkit.server.app import create_app
        from toolkit.server.metrics import Metrics
        from toolkit.server.models import ModelRegistry
        from toolkit.server.telemetry import configure_logging

        configure_logging(server.log_level, server.json_output, spans=not server.disable_spans)
        self._app = create_app(ModelRegistry([]), server, Metrics(), batch_call=self._line)
        self._started = False
        self._deployment = models
        self._models: Any = None

    def _start(self) -> None:
        """The runner resumes what a stopped deployment left (at the first request or health check: Ray Serve
        builds this object outside its event loop)."""
        if not self._started:
            self._started = True
            self._app.state.batch_runner.start()

    async def _line(self, endpoint: str, body: bytes, headers: list) -> tuple[int, dict, bytes]:
        if self._models is None:
            from ray import serve

            self._models = serve.get_deployment_handle(self._deployment,
                                                       app_name=serve.get_replica_context().app_name)
        return await self._models.batch_line.remote(endpoint, body, headers)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> tuple[int, list, bytes]:
        """One Batch API request a model replica received, answered here."""
        self._start()
        return await asgi_call(self._app, method, path, headers=[(b"host", b"batches"), *headers], body=body,
                               query=query)

    async def check_health(self) -> None:
        self._start()
