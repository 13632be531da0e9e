"""Paths that answer several request types, told apart by the body's fields: SageMaker's ``/invocations`` and
``/rerank``'s two dialects. One helper decodes the body once, picks the route, converts and calls it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response

from toolkit.errors import RequestError

__all__ = ["BodyRoute", "convert_body", "dispatch_body"]


@dataclass(frozen=True)
class BodyRoute:
    """A body holding any of ``keys`` is a ``kind`` request for ``handler(request, data)``."""

    keys: tuple[str, ...]
    kind: type
    handler: Callable[[Request, Any], Awaitable[Any]]
    exclusive: tuple[str, ...] = ()  # keys that must not be there too (a body of two dialects is a 400)
    dialect: str | None = None  # the error shape from here on (server.errors), set before the body is converted


def convert_body(body: dict, kind: type):
    """``body`` as a ``kind`` request (a 400 naming the bad field)."""
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid request: {exc}") from None


async def dispatch_body(request: Request, routes: Sequence[BodyRoute], expected: str) -> Response:
    """The answer of the first route whose keys the JSON object body has; a 400 saying ``expected`` otherwise."""
    body = await request.json()
    if isinstance(body, dict):
        for route in routes:
            if any(k in body for k in route.keys) and not any(k in body for k in route.exclusive):
                if route.dialect is not None:
                    request.state.dialect = route.dialect
                result = await route.handler(request, convert_body(body, route.kind))
                return result if isinstance(result, Response) else Response(result)
    raise RequestError(f"the body matches no route: give {expected}")
