"""Make the generated OpenAPI schema say what the server really does.

Litestar derives the schema from the handlers' types; this module adds what types
cannot say: each route's errors in its API's own shape (OpenAI's
``{"error": {...}}`` or Cohere's ``{"message"}``) for every status the gateway and
the routes answer, the one-of-two required inputs, and the accepted values of the
string choices. ``tests/test_schema.py`` fuzzes the live app against it.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from toolkit.runtime.encoding import EMBED_DTYPES, ENCODING_FORMATS, ENDIANNESS
from toolkit.server.errors import TEI_PATHS
from toolkit.settings import ServerOptions

__all__ = ["document_errors"]

_STRING = Schema(type=OpenAPIType.STRING)
_OPENAI_ERROR = Schema(
    type=OpenAPIType.OBJECT, required=["error"],
    properties={"error": Schema(type=OpenAPIType.OBJECT, required=["message", "type", "code"], properties={
        "message": _STRING, "type": _STRING,
        "param": Schema(one_of=[_STRING, Schema(type=OpenAPIType.NULL)]),
        "code": Schema(type=OpenAPIType.INTEGER)})},
    description="OpenAI's error shape",
)
_COHERE_ERROR = Schema(type=OpenAPIType.OBJECT, required=["message"], properties={"message": _STRING},
                       description="Cohere's error shape")
_TEI_ERROR = Schema(type=OpenAPIType.OBJECT, required=["error", "error_type"],
                    properties={"error": _STRING, "error_type": _STRING}, description="text-embeddings-inference's shape")

_STATUSES = {
    400: "Invalid input: malformed JSON, wrong types, unknown choices (listed), empty or too long inputs, bad token ids",
    401: "Missing or wrong API key (only when the server has one)",
    404: "The model named in `model` is not served here",
    413: "The body is larger than the payload limit",
    415: "The body's Content-Type is not JSON",
    429: "Overloaded: too many requests in flight or queued inputs (see Retry-After)",
    422: "Invalid input (TEI's routes: malformed or invalid body)",
    424: "Inference failed (TEI's routes)",
    500: "Inference failed",
    503: "Not ready, or shutting down past the grace period",
}
_TEI_STATUSES = {404, 413, 415, 422, 424, 429, 503}
_CHOICES = {
    "OpenAIEmbeddingRequest": {"encoding_format": ENCODING_FORMATS, "embed_dtype": EMBED_DTYPES,
                               "endianness": ENDIANNESS, "truncation_side": ("right", "left")},
    "CohereEmbedRequest": {"truncate": ("END", "START", "NONE")},
}
_ONE_OF_REQUIRED = {
    "OpenAIEmbeddingRequest": ("input", "messages"),
    "CohereEmbedRequest": ("texts", "inputs"),
    "TokenizeRequest": ("prompt", "messages"),
}


def _error_response(status: int, shape: str) -> OpenAPIResponse:
    schema = {"cohere": _COHERE_ERROR, "tei": _TEI_ERROR, "openai": _OPENAI_ERROR,
              "either": Schema(one_of=[_OPENAI_ERROR, _TEI_ERROR])}[shape]
    headers = {}
    if status == 429:
        headers["Retry-After"] = OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER), description="seconds")
    if status == 401:
        headers["WWW-Authenticate"] = OpenAPIHeader(schema=_STRING)
    return OpenAPIResponse(description=_STATUSES[status], headers=headers or None,
                           content={"application/json": OpenAPIMediaType(schema=schema)})


def _non_null(schema: Schema) -> Schema:
    if schema.one_of:
        kept = [s for s in schema.one_of if getattr(s, "type", None) != OpenAPIType.NULL]
        return kept[0] if len(kept) == 1 else Schema(one_of=kept, description=schema.description)
    return schema


def document_errors(app: Litestar, options: ServerOptions) -> None:
    """Patch ``app.openapi_schema`` in place (Litestar serves the cached object)."""
    schema = app.openapi_schema
    for path, item in (schema.paths or {}).items():
        for method in ("get", "post"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            statuses = {503} if path == "/ready" else set()
            shape = "tei" if path in TEI_PATHS else "either" if path == "/rerank" else (
                "cohere" if path.startswith("/v2/") else "openai")
            if not path.startswith(("/health", "/ready", "/metrics", "/docs")):
                statuses = {400, 404, 429, 500, 503} | ({413, 415} if method == "post" else set())
                statuses = _TEI_STATUSES | statuses if shape == "either" else _TEI_STATUSES if shape == "tei" else statuses
                if options.api_key:
                    statuses.add(401)
            responses = {code: r for code, r in (operation.responses or {}).items() if not code.startswith("4")}
            for status in sorted(statuses):
                responses[str(status)] = _error_response(status, shape)
            if path == "/v1/embeddings" and "200" in responses:  # encoding_format bytes / bytes_only
                ok = responses["200"]
                ok.content = {**(ok.content or {}), "application/octet-stream": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                                  description="rows back to back (encoding_format bytes / bytes_only)"))}
                ok.headers = {**(ok.headers or {}), "metadata": OpenAPIHeader(
                    schema=_STRING, required=False,
                    description="encoding_format bytes: JSON with id, created, model, usage and per-row "
                                "index, embed_dtype, endianness, start, end, shape (vLLM's layout)")}
            operation.responses = responses
            if options.api_key and not path.startswith(("/health", "/ready", "/metrics")):
                operation.security = [{"BearerAuth": []}]
    components = (schema.components.schemas or {}) if schema.components else {}
    for name, component in components.items():
        base = name.rsplit(".", 1)[-1]
        for field, values in _CHOICES.get(base, {}).items():
            if component.properties and field in component.properties:
                component.properties[field] = Schema(type=OpenAPIType.STRING, enum=list(values),
                                                     default=component.properties[field].default)
        if base in _ONE_OF_REQUIRED and component.properties:
            fields = _ONE_OF_REQUIRED[base]
            for field in fields:
                if field in component.properties:
                    component.properties[field] = _non_null(component.properties[field])
            component.any_of = [Schema(required=[field]) for field in fields]
