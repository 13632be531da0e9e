"""Make the generated OpenAPI schema say what the server really does.

Litestar derives the schema from the handlers' types: each route returns ``Response[T]`` of a
msgspec Struct that the handler really builds, so a 200's schema cannot drift from its body. The
few wire types shared by several dialects live here (``UsageInfo``, Cohere's ``meta`` parts).
This module then adds what types cannot say: each route's errors in its API's own shape (OpenAI's
``{"error": {...}}`` or Cohere's ``{"message"}``) for every status the gateway and the routes
answer, the success bodies of the routes that build plain lists (TEI's) or dispatch by body
(``/invocations``), ``/v1/embeddings``' octet-stream answer, the one-of-two required inputs, and
the accepted values of the string choices. ``tests/test_schema.py`` fuzzes the live app against it
and validates a real answer of every route; ``tests/test_openapi_client.py`` drives a live server
with a client generated from ``/openapi.json``.
"""

from __future__ import annotations

import copy
from typing import Literal

import msgspec
from litestar import Litestar
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    Reference,
    RequestBody,
    Schema,
)
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from toolkit.runtime.encoding import EMBED_DTYPES, ENCODING_FORMATS, ENDIANNESS
from toolkit.server.errors import TEI_PATHS
from toolkit.settings import ServerOptions

__all__ = ["CohereApiVersion", "CohereTokens", "UsageInfo", "document_schema"]


class UsageInfo(msgspec.Struct):
    """vLLM's UsageInfo: OpenAI's usage plus ``completion_tokens`` (always 0 for pooling)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, tokens: int) -> UsageInfo:
        """A pooling request's usage: its input tokens, nothing generated."""
        return cls(prompt_tokens=tokens, total_tokens=tokens, completion_tokens=0)


class ListResponse(msgspec.Struct):
    """The head of vLLM's list answers (embeddings, pooling, score, classify): their ``data`` and ``usage``
    follow, declared by each."""

    id: str
    object: Literal["list"]
    created: int
    model: str


class CohereApiVersion(msgspec.Struct):
    version: str


class CohereTokens(msgspec.Struct):
    input_tokens: int


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
_TEI_STATUSES = {413, 415, 422, 424, 429, 503}  # TEI has no 404: an unknown model is 422 validation there
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


_INTEGER = Schema(type=OpenAPIType.INTEGER)
_NUMBER = Schema(type=OpenAPIType.NUMBER)


def _array(items: Schema | Reference) -> Schema:
    return Schema(type=OpenAPIType.ARRAY, items=items)


def _object(description: str | None = None, **properties: Schema | Reference) -> Schema:
    return Schema(type=OpenAPIType.OBJECT, required=sorted(properties), properties=properties, description=description)


def _ref(name: str) -> Reference:
    return Reference(ref=f"#/components/schemas/{name}")


# Components written out: the error shapes (one model each in a generated client), and the answers of TEI's
# routes, plain lists that ``server.tei_api`` builds from numpy rows.
_COMPONENTS = {
    "OpenAIError": _OPENAI_ERROR,
    "CohereError": _COHERE_ERROR,
    "TEIError": _TEI_ERROR,
    "TEISparseValue": _object(index=_INTEGER, value=_NUMBER),
    "TEIPrediction": _object(score=_NUMBER, label=_STRING),
    "TEIClassifierModel": _object(id2label=Schema(type=OpenAPIType.OBJECT, additional_properties=_STRING),
                                  label2id=Schema(type=OpenAPIType.OBJECT, additional_properties=_INTEGER)),
    "TEIInfo": _object(
        "text-embeddings-inference's /info",
        model_id=_STRING, model_sha=Schema(one_of=[_STRING, Schema(type=OpenAPIType.NULL)]), model_dtype=_STRING,
        model_type=Schema(one_of=[
            _object(embedding=_object(pooling=Schema(one_of=[_STRING, Schema(type=OpenAPIType.NULL)]))),
            _object(classifier=_ref("TEIClassifierModel")), _object(reranker=_ref("TEIClassifierModel"))]),
        max_concurrent_requests=_INTEGER, max_input_length=_INTEGER, max_batch_tokens=_INTEGER,
        max_client_batch_size=_INTEGER, auto_truncate=Schema(type=OpenAPIType.BOOLEAN),
        tokenization_workers=_INTEGER, version=_STRING),
}
_TEI_SUCCESS = {
    "/embed": _array(_array(_NUMBER)),  # a vector per input
    "/embed_all": _array(_array(_array(_NUMBER))),  # a vector per token per input
    "/embed_sparse": _array(_array(_ref("TEISparseValue"))),  # the non-zero (index, value) pairs per input
    "/info": _ref("TEIInfo"),
    # every label best first: a list for one input, a list per input for a batch (or any Inference API body)
    "/predict": Schema(one_of=[_array(_ref("TEIPrediction")), _array(_array(_ref("TEIPrediction")))]),
}
# /invocations: SageMaker's entry point answers the route its body selects
_INVOCATIONS = {"OpenAIEmbeddingRequest": "OpenAIEmbeddingResponse", "ScoreRequest": "ScoreResponse",
                "TokenizeRequest": "TokenizeResponse", "DetokenizeRequest": "DetokenizeResponse"}
_BYTES = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                                        description="rows back to back (encoding_format bytes / bytes_only)"))
_BYTES_METADATA = OpenAPIHeader(
    schema=_STRING, required=False,
    description="encoding_format bytes: JSON with id, created, model, usage and per-row index, embed_dtype, "
                "endianness, start, end, shape (vLLM's layout)")

_UPLOAD = RequestBody(required=True, description="a JSONL file of requests for a batch (OpenAI's files.create)",
                      content={"multipart/form-data": OpenAPIMediaType(schema=_object(
                          file=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
                          purpose=Schema(type=OpenAPIType.STRING, enum=["batch"])))})


def _error_response(status: int, shape: str) -> OpenAPIResponse:
    schema = {"cohere": _ref("CohereError"), "tei": _ref("TEIError"), "openai": _ref("OpenAIError"),
              "either": Schema(one_of=[_ref("OpenAIError"), _ref("TEIError")])}[shape]
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


def _success(operation, path: str, keys: dict[str, str]) -> None:
    """The success bodies that handler types cannot give: TEI's lists, /invocations' four answers, and
    /v1/embeddings' (and /embeddings', /invocations', /pooling's) application/octet-stream rows."""
    ok = (operation.responses or {}).get("200")
    if ok is None:
        return
    if path in _TEI_SUCCESS:
        ok.content = {"application/json": OpenAPIMediaType(schema=_TEI_SUCCESS[path])}
    elif path == "/invocations":
        answers = [_ref(keys[r]) for r in (*_INVOCATIONS.values(), "VLLMRerankResponse", "ClassificationResponse") if r in keys]
        tei_items = [_array(_NUMBER), *([_ref(keys["TEIRank"])] if "TEIRank" in keys else []),
                     _ref("TEIPrediction"), _array(_ref("TEIPrediction"))]
        tei = Schema(type=OpenAPIType.ARRAY, items=Schema(one_of=tei_items) if len(tei_items) > 1 else tei_items[0],
                     description="TEI's answers, as POST / gives them: a vector per input (inputs), the ranks "
                                 "(query + texts) or a classifier's predictions")
        ok.content = {"application/json": OpenAPIMediaType(schema=Schema(one_of=[*answers, tei]))}
        operation.request_body = RequestBody(required=True, description=(
            "an embeddings (input or messages), score (queries, data_1 or text_1), tokenize (prompt), "
            "detokenize (tokens) or rerank (query + documents) body, or TEI's (inputs; query + texts)"), content={"application/json": OpenAPIMediaType(
                schema=Schema(any_of=[_ref(keys[r]) for r in _INVOCATIONS]))})
    if path in ("/v1/embeddings", "/embeddings", "/invocations", "/pooling"):  # encoding_format bytes / bytes_only
        ok.content = {**(ok.content or {}), "application/octet-stream": _BYTES}
        ok.headers = {**(ok.headers or {}), "metadata": _BYTES_METADATA}


def _single_one_of(schema: Schema) -> None:
    """``X | UnsetType`` (a field that is absent rather than null) comes out as ``oneOf: [X]``: just X."""
    for name, field in (schema.properties or {}).items():
        if isinstance(field, Schema) and field.one_of and len(field.one_of) == 1:
            schema.properties[name] = field.one_of[0]


EITHER_PATHS = ("/rerank", "/tokenize", "/", "/invocations")  # one path, TEI's body or another's: either error shape
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")  # no API key needed


def open_paths(options: ServerOptions) -> tuple[str, ...]:
    """The paths that need no API key; with a metrics port (``--prometheus-port``) /metrics is open there and
    behind the key on the API port."""
    return OPEN_PATHS if options.prometheus_port is None else tuple(p for p in OPEN_PATHS if p != "/metrics")


PROBES = ("/", "/ping")  # TEI's and SageMaker's liveness probes: open for GET (POST / is TEI's API entry point)


def is_open(method: str, path: str, options: ServerOptions) -> bool:
    """Whether a request needs no API key (and is never refused as overload): the open paths, GET probes."""
    return path.startswith(open_paths(options)) or (method in ("GET", "HEAD") and path in PROBES)


def document_schema(app: Litestar, options: ServerOptions) -> None:
    """Patch ``app.openapi_schema`` in place (Litestar serves the cached object): success bodies the handler
    types cannot give, each route's errors in its dialect's shape, security, required inputs, choices."""
    schema = app.openapi_schema
    components = schema.components.schemas
    components.update(copy.deepcopy(_COMPONENTS))
    keys = {name.rsplit(".", 1)[-1]: name for name in components}  # short name -> component key
    for path, item in (schema.paths or {}).items():
        for method in ("get", "post"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            statuses = {503} if path == "/ready" else set()
            shape = "tei" if path in TEI_PATHS else "either" if path in EITHER_PATHS else (
                "cohere" if path.startswith("/v2/") else "openai")
            if not (path.startswith(("/health", "/ready", "/metrics", "/docs")) or is_open(method.upper(), path, options)):
                statuses = {400, 404, 429, 500, 503} | ({413, 415} if method == "post" else set())
                statuses = _TEI_STATUSES | statuses if shape == "either" else _TEI_STATUSES if shape == "tei" else statuses
                if options.api_key:
                    statuses.add(401)
            _success(operation, path, keys)
            if (path, method) == ("/v1/files", "post"):
                operation.request_body = _UPLOAD
            responses = {code: r for code, r in (operation.responses or {}).items() if not code.startswith("4")}
            for status in sorted(statuses):
                responses[str(status)] = _error_response(status, shape)
            operation.responses = responses
            if options.api_key and not is_open(method.upper(), path, options):
                operation.security = [{"BearerAuth": []}]
                if path == "/metrics":  # open on the metrics port only
                    operation.description = (f"Behind the API key on this port; open on port "
                                             f"{options.prometheus_port} (--prometheus-port).")
                    responses["401"] = _error_response(401, shape)
    for name, component in components.items():
        _single_one_of(component)
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
            # inside allOf: the same constraint, and a client generator still makes a model of the body
            component.all_of = [Schema(any_of=[Schema(required=[field]) for field in fields])]
