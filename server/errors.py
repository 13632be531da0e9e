"""Every failure rendered in its API's own shape.

``/v2/*`` answers Cohere's ``{"message"}``; TEI's routes (``/embed``, ``/embed_all``, ``/embed_sparse``,
``/info``, and ``/rerank`` when its body is TEI's) TEI's ``{"error", "error_type"}`` with TEI's status
codes (validation 413 for too-long inputs, 422 for other bad input, 424 backend, 429 overloaded, 503
unhealthy); every other route OpenAI's ``{"error": {"message", "type", "param", "code"}}``, where vLLM's own
routes (``VLLM_PATHS``) put vLLM's exception name in ``type`` (``BadRequestError``, ``NotFoundError``,
``InternalServerError``) as vLLM's server does, and OpenAI's ``/v1/embeddings`` keeps OpenAI's types. Nothing
escapes as a bare 500.

A ``model`` the server does not serve is 404 in OpenAI's and Cohere's dialects (OpenAI's own answer) and
422 validation in TEI's: TEI serves one model and has no 404 (its error types map to 503, 424, 429, 422,
413 and 400), so an unknown ``model``, our extension to its requests, is bad input like any other.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from toolkit.errors import (
    BackendError,
    InputTooLongError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    ToolkitError,
)

__all__ = ["TEI_PATHS", "VLLM_PATHS", "dialect_of", "error_body", "error_response", "handle_exception"]

TEI_PATHS = ("/embed", "/embed_all", "/embed_sparse", "/similarity", "/decode", "/info", "/predict")
# vLLM's own routes: OpenAI's shape with vLLM's `type`, the name of the exception vLLM raised (a TEI body on
# /rerank, /tokenize or /invocations switches to TEI's dialect before anything can fail)
VLLM_PATHS = ("/pooling", "/score", "/v1/score", "/rerank", "/v1/rerank", "/tokenize", "/detokenize",
              "/tokenizer_info", "/invocations", "/classify")
_VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 415: "BadRequestError",
               422: "BadRequestError", 424: "BadRequestError", 500: "InternalServerError"}

log = logging.getLogger("toolkit.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


def dialect_of(path: str, request: Request | None = None) -> str:
    """"tei", "cohere" or "openai": whose error shape this request gets (a route may set request.state.dialect)."""
    if request is not None and "dialect" in request.state:
        return request.state.dialect
    if path in TEI_PATHS:
        return "tei"
    if path in VLLM_PATHS:
        return "vllm"
    return "cohere" if path.startswith("/v2/") else "openai"


def _tei_status(status: int, exc: Exception | None) -> tuple[int, str]:
    """TEI's status and error_type for a failure (text-embeddings-inference's ErrorType mapping; its enum is
    serialized by variant name, so the types are capitalized: "Validation", "Backend", ...)."""
    if isinstance(exc, OverloadedError) or status == 429:
        return 429, "Overloaded"
    if isinstance(exc, NotReadyError) or status == 503:
        return 503, "Unhealthy"
    if isinstance(exc, BackendError) or status >= 500 or status == 424:  # 424: the model cannot do that (TEI's)
        return 424, "Backend"
    if isinstance(exc, InputTooLongError) or status == 413:
        return 413, "Validation"
    if isinstance(exc, ModelNotFoundError):  # TEI has no 404: a bad `model` is bad input
        return 422, "Validation"
    if status in (401, 404, 405, 415):
        return status, "Validation"
    return 422, "Validation"


def error_body(path: str, status: int, message: str, error_type: str | None = None, param: str | None = None,
               dialect: str | None = None, exc: Exception | None = None) -> tuple[int, bytes]:
    """(status, JSON body) of a failure in the dialect's shape; TEI's dialect may change the status."""
    match dialect or dialect_of(path):
        case "cohere":
            return status, msgspec.json.encode({"message": message})
        case "tei":
            status, kind = _tei_status(status, exc)
            return status, msgspec.json.encode({"error": message, "error_type": kind})
        case dialect_name:
            kind = _VLLM_TYPES.get(status) if dialect_name == "vllm" else None
            error = {"message": message, "type": kind or error_type or _TYPES.get(status, "internal_error"), "param": param,
                     "code": status}
            return status, msgspec.json.encode({"error": error})


def error_response(request: Request, status: int, message: str, error_type: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None,
                   exc: Exception | None = None) -> Response:
    path = request.url.path
    status, body = error_body(path, status, message, error_type, param, dialect_of(path, request), exc)
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def _bad_request_message(exc: HTTPException) -> str:
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts = [str(e.get("message", "")) + (f" (at {e['key']})" if e.get("key") else "") for e in extra if isinstance(e, dict)]
    detail = "; ".join(p for p in parts if p) or exc.detail
    if any(s in detail for s in ("JSON", "Unexpected character", "Input data was truncated", "Invalid character")):
        return f"the body is not valid JSON: {detail}"
    return f"invalid request: {detail}"


def handle_exception(request: Request, exc: Exception) -> Response:
    path = request.url.path
    if isinstance(exc, ToolkitError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverloadedError) else None
        if exc.status_code >= 500:
            log.error("%s %s: %s", request.method, path, exc.message)
        return error_response(request, exc.status_code, exc.message, exc.error_type, exc.param, headers, exc)
    if isinstance(exc, ValidationException) or (isinstance(exc, HTTPException) and exc.status_code == 400):
        return error_response(request, 400, _bad_request_message(exc))
    if isinstance(exc, HTTPException) and exc.status_code == 413:  # Litestar's, rendered through the tree
        limit = request.app.state.options.payload_limit
        return handle_exception(request, PayloadTooLargeError(
            f"the request body is larger than the server's payload limit ({limit} bytes; --payload-limit)"))
    if isinstance(exc, HTTPException):
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}  # 405 keeps Allow
        return error_response(request, exc.status_code, exc.detail, headers=headers or None)
    log.exception("unhandled error on %s %s", request.method, path)
    return error_response(request, 500, f"internal error: {type(exc).__name__}", exc=exc)
