"""The server's one JSON boundary: request bodies decoded here, every decoding failure a 4xx.

Litestar decodes a handler's ``data`` through ``Request.json()``; ``ToolkitRequest``
overrides it so that what msgspec raises on hostile bodies (``RecursionError`` for JSON
nested past its depth limit, ``UnicodeDecodeError`` for invalid UTF-8, "Input data was
truncated" for a lone UTF-16 surrogate escape) becomes a ``RequestError`` that says what
is wrong, and a non-JSON ``Content-Type`` becomes 415.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.types import Empty

from toolkit.errors import RequestError, UnsupportedMediaTypeError

__all__ = ["ToolkitRequest", "decode_json_body"]

_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json", "*/*") or media.endswith("+json")


def decode_json_body(body: bytes) -> Any:
    """Untyped JSON of a request body; RequestError naming the fault otherwise."""
    try:
        return msgspec.json.decode(body or b"null")
    except RecursionError:
        raise RequestError("the JSON body nests arrays or objects too deeply") from None
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    except msgspec.DecodeError as exc:
        match = _LONE_SURROGATE.search(body)
        if match is not None:
            escape = match.group().decode()
            raise RequestError(f"the body is not valid JSON text: it has a lone UTF-16 surrogate escape "
                               f"({escape}) at byte {match.start()}; pair it or remove it") from None
        raise RequestError(f"the body is not valid JSON: {exc}") from None


class ToolkitRequest(Request):
    """Litestar's Request with JSON decoding at the toolkit's boundary (see the module docstring)."""

    async def json(self) -> Any:
        if self._json is Empty:
            content_type = self.headers.get("content-type", "")
            if not _is_json(content_type):
                raise UnsupportedMediaTypeError(
                    f"Content-Type '{content_type}' is not JSON: send application/json "
                    "(with curl: -H 'Content-Type: application/json')")
            self._json = decode_json_body(await self.body())
        return self._json
