"""Every failure rendered in its API's own shape.

``/v2/*`` answers Cohere's ``{"message"}``; every other route OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Nothing escapes as a bare 500.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from toolkit.errors import OverloadedError, PayloadTooLargeError, ToolkitError

__all__ = ["error_body", "error_response", "handle_exception"]

log = logging.getLogger("toolkit.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


def error_body(path: str, status: int, message: str, error_type: str | None = None, param: str | None = None) -> bytes:
    if path.startswith("/v2/"):
        return msgspec.json.encode({"message": message})
    error = {"message": message, "type": error_type or _TYPES.get(status, "internal_error"), "param": param, "code": status}
    return msgspec.json.encode({"error": error})


def error_response(path: str, status: int, message: str, error_type: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(content=error_body(path, status, message, error_type, param), status_code=status,
                    media_type="application/json", headers=headers)


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
        return error_response(path, exc.status_code, exc.message, exc.error_type, exc.param, headers)
    if isinstance(exc, ValidationException) or (isinstance(exc, HTTPException) and exc.status_code == 400):
        return error_response(path, 400, _bad_request_message(exc))
    if isinstance(exc, HTTPException) and exc.status_code == 413:  # Litestar's, rendered through the tree
        limit = request.app.state.options.payload_limit
        return handle_exception(request, PayloadTooLargeError(
            f"the request body is larger than the server's payload limit ({limit} bytes; --payload-limit)"))
    if isinstance(exc, HTTPException):
        message = exc.detail
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}  # 405 keeps Allow
        return error_response(path, exc.status_code, message, headers=headers or None)
    log.exception("unhandled error on %s %s", request.method, path)
    return error_response(path, 500, f"internal error: {type(exc).__name__}")
