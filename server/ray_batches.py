"""The Batch API on Ray Serve: one deployment holds the files and batches; the replicas answer the lines.

``toolkit serve --engine ray --batch-dir DIR`` adds a deployment of one replica, ``toolkit-batches``, beside the
model replicas. It owns ``DIR`` (the store and the batch runner, as ``toolkit serve`` runs them in one process),
so there is one record of every file and batch whichever replica a request reaches: each model replica hands the
requests for ``/v1/files`` and ``/v1/batches`` to it whole (``forward_batch_api``). A batch's lines go back to the
model replicas through Ray Serve's handle (``answer_line``): Ray spreads them over the replicas, and each line
meets the very route an online request meets, in the batch lane of that replica's batcher (behind every online
request there). A restarted batch deployment resumes its batches from ``DIR`` as a restarted server does.
``DIR`` must be writable where that one replica runs: one machine, or a filesystem the nodes share.
"""

from __future__ import annotations

from typing import Any

from litestar import HttpMethod, Request, Response, route

from toolkit.errors import PayloadTooLargeError
from toolkit.server.asgi import asgi_call

__all__ = ["BATCH_DEPLOYMENT", "BatchApi", "answer_line", "forward_batch_api"]

BATCH_DEPLOYMENT = "toolkit-batches"
_FORWARDED = (b"authorization", b"content-type", b"content-length", b"x-request-id", b"accept")


async def answer_line(app, endpoint: str, body: bytes, headers: list) -> tuple[int, dict, bytes]:
    """One batch line answered by this replica's ``app``, its inputs in the batch lane of the batcher."""
    from toolkit.runtime.async_embedder import BATCH_LANE, queue_lane
    from toolkit.server.batch_runner import call_route

    queue_lane.set(BATCH_LANE)  # this task's own context: online requests of the replica keep their lane
    return await call_route(app, endpoint, body, headers)


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


class BatchApi:
    """The batch deployment (one replica): the store and the runner over an app of the Batch API's routes only,
    its lines sent to the model deployment of the same Ray Serve application."""

    def __init__(self, server) -> None:
        from toolkit.server.app import create_app
        from toolkit.server.metrics import Metrics
        from toolkit.server.models import ModelRegistry
        from toolkit.server.telemetry import configure_logging

        configure_logging(server.log_level, server.json_output, spans=not server.disable_spans)
        self._app = create_app(ModelRegistry([]), server, Metrics(), batch_call=self._line)
        self._started = False
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

            from toolkit.server.ray import DEPLOYMENT

            self._models = serve.get_deployment_handle(DEPLOYMENT, app_name=serve.get_replica_context().app_name)
        return await self._models.batch_line.remote(endpoint, body, headers)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> tuple[int, list, bytes]:
        """One Batch API request a model replica received, answered here."""
        self._start()
        return await asgi_call(self._app, method, path, headers=[(b"host", b"batches"), *headers], body=body,
                               query=query)

    async def check_health(self) -> None:
        self._start()
