"""The OpenAPI schema tells the truth: schemathesis fuzzes the app (in process, ASGI) against it.

Checks: no 5xx for any generated body, every status the server answers is documented for that
route, every response's Content-Type and body match what the schema says for that status (errors in
OpenAI's or Cohere's shape, each 200 its route's real schema), documented headers are present, and a
method a route lacks gets 405. Bounded: a fixed number of examples per operation, no shrinking deadline.
Then a real 200 of every route (each dialect, each shape) is validated against the documented schema
made strict (no undocumented field), so a handler and its schema cannot drift apart.
"""

from __future__ import annotations

import pytest
from conftest import async_app_client

schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
import jsonschema  # noqa: E402  (schemathesis' own dependency)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from litestar.testing import AsyncTestClient  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from toolkit.server.app import create_app, load_models  # noqa: E402
from toolkit.server.metrics import Metrics  # noqa: E402
from toolkit.settings import RuntimeOptions, ServerOptions  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, unsupported_method]


@pytest.fixture(scope="module")
def app(tiny_artifact):
    metrics = Metrics()
    registry = load_models([tiny_artifact], ["tiny"], RuntimeOptions(device="cpu"), metrics)
    application = create_app(registry, ServerOptions(api_key="fuzz-key", max_client_batch_size=16), metrics)
    yield application
    for served in registry.models.values():
        served.engine.close()


def _client(tiny_artifact):
    """The same app as ``app``, its own engine, for ``async with``: the client runs the lifespan, whose shutdown
    closes it."""
    return async_app_client(tiny_artifact, api_key="fuzz-key", max_client_batch_size=16)


def _schema(app):
    async def without_lifespan(scope, receive, send):
        """schemathesis' ASGI transport runs the lifespan around every call; the app's shutdown would stop
        its batching worker after the first one, so answer lifespan events here."""
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)


def test_schema_documents_errors_security_and_required_inputs(app):
    import json

    doc = json.loads(json.dumps(app.openapi_schema.to_schema()))  # what /docs/openapi.json serves
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    assert {"400", "401", "404", "413", "415", "429", "500", "503"} <= set(embeddings["responses"])
    assert embeddings["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"}
    assert "error" in doc["components"]["schemas"]["OpenAIError"]["properties"]
    cohere = doc["paths"]["/v2/embed"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert cohere == {"$ref": "#/components/schemas/CohereError"}
    cohere = doc["components"]["schemas"]["CohereError"]
    assert cohere["required"] == ["message"] and "error" not in cohere["properties"]
    assert doc["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    request = next(v for k, v in doc["components"]["schemas"].items() if k.endswith("OpenAIEmbeddingRequest"))
    assert request["allOf"] == [{"anyOf": [{"required": ["input"]}, {"required": ["messages"]}]}]
    assert "null" not in str(request["properties"]["input"])
    assert request["properties"]["encoding_format"]["enum"] == ["float", "base64", "bytes", "bytes_only"]


@pytest.mark.parametrize("method_path", ["POST /v1/embeddings", "POST /v2/embed", "POST /v1/score", "POST /tokenize",
                                         "POST /detokenize", "GET /v1/models", "GET /tokenizer_info", "GET /ready",
                                         "POST /embed", "POST /embed_all", "POST /v1/rerank", "POST /v2/rerank",
                                         "POST /pooling", "POST /embedding", "POST /invocations", "POST /similarity",
                                         "POST /decode", "POST /", "POST /embeddings"])
def test_fuzz_against_the_schema(app, method_path):
    method, path = method_path.split()
    operation = _schema(app)[path][method]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case):
        for headers in ({"Authorization": "Bearer fuzz-key"}, {}):  # with the key, and without (401)
            case.call_and_validate(headers=headers, checks=CHECKS)

    check()


def _strict(node):
    """The documented schema with ``additionalProperties: false`` on every object that lists its properties."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    return [_strict(v) for v in node] if isinstance(node, list) else node


def _validate(doc: dict, method: str, path: str, response) -> None:
    """The response's status, Content-Type and body are what ``doc`` documents for the route."""
    documented = doc["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in documented, (path, response.status_code, response.text[:300])
    content = documented[str(response.status_code)]["content"]
    media = response.headers["content-type"].split(";")[0]
    assert any(m.split(";")[0] == media for m in content), (path, media, list(content))
    if media != "application/json":
        return
    schema = next(c["schema"] for m, c in content.items() if m.split(";")[0] == media)
    validator = jsonschema.Draft202012Validator({**_strict(schema), "components": _strict(doc["components"])})
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(response.json())]
    assert not errors, (method, path, errors[:5])


REAL_REQUESTS = [  # (method, path, body): every route, each dialect and each answer shape
    ("POST", "/v1/embeddings", {"input": ["one text", "two texts"], "additional_data": {"k": [1]}}),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "base64", "embed_dtype": "float16"}),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "bytes"}),
    ("GET", "/v1/models", None),
    ("POST", "/v2/embed", {"texts": ["a", "b"], "input_type": "search_query",
                           "embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"]}),
    ("POST", "/v2/embed", {"inputs": [{"content": [{"type": "text", "text": "hi"}]}]}),
    ("POST", "/v2/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1}),
    ("POST", "/v2/rerank", {"query": "q", "documents": ["a", "b"], "return_documents": True}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"], "return_documents": False}),
    ("POST", "/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"], "return_text": True}),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"]}),
    ("POST", "/v1/score", {"queries": "q", "documents": ["a", "b"]}),
    ("POST", "/score", {"text_1": ["a", "b"], "text_2": ["c", "d"]}),
    ("POST", "/tokenize", {"prompt": "hello world", "return_token_strs": True}),
    ("POST", "/tokenize", {"prompt": "hello world"}),
    ("POST", "/detokenize", {"tokens": [5, 6, 7]}),
    ("GET", "/tokenizer_info", None),
    ("POST", "/invocations", {"input": ["x"]}),
    ("POST", "/invocations", {"input": ["x"], "encoding_format": "bytes_only"}),
    ("POST", "/invocations", {"queries": "q", "documents": ["a"]}),
    ("POST", "/invocations", {"prompt": "hello"}),
    ("POST", "/invocations", {"tokens": [5, 6]}),
    ("POST", "/embed", {"inputs": ["a", "b"]}),
    ("POST", "/embed_all", {"inputs": "a b"}),
    ("GET", "/info", None),
    ("POST", "/pooling", {"input": ["a", "b"]}),
    ("POST", "/pooling", {"input": "a b", "task": "token_embed"}),
    ("POST", "/pooling", {"input": "a", "encoding_format": "base64"}),
    ("POST", "/embedding", {"content": "a"}),
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
]


@pytest.mark.anyio
async def test_every_route_answers_its_documented_200(tiny_artifact):
    async with _client(tiny_artifact) as client:
        doc = (await client.get("/openapi.json")).json()  # no key needed
        assert doc == (await client.get("/docs/openapi.json")).json()
        for method, path, body in REAL_REQUESTS:
            response = await client.request(method, path, json=body, headers={"Authorization": "Bearer fuzz-key"})
            assert response.status_code == 200, (path, body, response.text[:300])
            _validate(doc, method, path, response)
        bad = await client.post("/v1/embeddings", json={"input": "x"})  # and an error: documented too
        assert bad.status_code == 401
        _validate(doc, "POST", "/v1/embeddings", bad)


@pytest.mark.anyio
async def test_strict_validation_catches_drift(tiny_artifact):
    """A body with a field the schema does not list, or without one it requires, fails the validation."""
    async with _client(tiny_artifact) as client:
        doc = (await client.get("/openapi.json")).json()
    good = {"status": "ready", "models": ["tiny"]}
    _validate(doc, "GET", "/ready", httpx.Response(200, json=good))
    for body in ({**good, "extra": 1}, {"status": "ready"}, {"status": "up", "models": []}):
        with pytest.raises(AssertionError):
            _validate(doc, "GET", "/ready", httpx.Response(200, json=body))


@pytest.mark.anyio
async def test_embed_sparse_answers_its_documented_200(splade_artifact):
    metrics = Metrics()
    registry = load_models([splade_artifact], ["splade"], RuntimeOptions(device="cpu"), metrics)
    async with AsyncTestClient(create_app(registry, ServerOptions(), metrics)) as client:
        doc = (await client.get("/openapi.json")).json()
        response = await client.post("/embed_sparse", json={"inputs": ["a sparse text", "another"]})
        assert response.status_code == 200, response.text
        _validate(doc, "POST", "/embed_sparse", response)
        _validate(doc, "POST", "/pooling", await client.post("/pooling", json={"input": "a sparse text"}))


@pytest.mark.anyio
async def test_openapi_json_and_offline_docs(tiny_artifact):
    async with _client(tiny_artifact) as client:
        served = await client.get("/openapi.json")  # the server has an API key: the schema needs none
        assert served.status_code == 200 and served.headers["content-type"].startswith("application/vnd.oai.openapi+json")
        assert "/openapi.json" not in served.json()["paths"]
        page = await client.get("/docs")
        assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text  # no CDN
        assert (await client.get("/docs/assets/swagger-ui-bundle.js")).status_code == 200
