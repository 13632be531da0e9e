"""Response bodies and checks that several routes share: vLLM's binary row encodings (/v1/embeddings and
/pooling)."""

from __future__ import annotations

import json

import msgspec
from litestar import Response

from toolkit.errors import RequestError
from toolkit.runtime.encoding import EMBED_DTYPES, ENDIANNESS, pack_rows
from toolkit.server.limits import check_choice

__all__ = ["bytes_response", "check_row_encoding"]


def check_row_encoding(encoding_format: str, formats, embed_dtype: str, endianness: str) -> None:
    """``encoding_format`` one of ``formats``; vLLM's ``embed_dtype`` (its sentence, then the choices) and
    ``endianness``."""
    check_choice(encoding_format, formats, "encoding_format")
    if embed_dtype not in EMBED_DTYPES:
        raise RequestError(f"embed_dtype={embed_dtype!r} is not supported. Supported types: "
                           f"{', '.join(EMBED_DTYPES)}", param="embed_dtype")
    check_choice(endianness, ENDIANNESS, "endianness")


def bytes_response(rows, encoding_format: str, embed_dtype: str, endianness: str, head: dict,
                   headers: dict) -> Response:
    """``encoding_format`` bytes / bytes_only: the rows back to back as application/octet-stream; with bytes, vLLM's
    per-item layout (dtype, byte order, span, shape) in the ``metadata`` header (/v1/embeddings and /pooling)."""
    body, items = pack_rows(rows, embed_dtype, endianness)
    if encoding_format == "bytes":
        meta = {"id": head["id"], "created": head["created"], "model": head["model"], "data": items,
                "usage": msgspec.to_builtins(head["usage"])}
        headers = {**headers, "metadata": json.dumps(meta)}  # ASCII-escaped: a header carries Latin-1 only
    return Response(body, media_type="application/octet-stream", headers=headers)


