"""The OpenAPI schema tells the truth: schemathesis fuzzes the app (in process, ASGI) against it.

Checks: no 5xx for any generated body, every status the server answers is documented for that
route, every response's Content-Type and body match what the schema says for that status (errors in
OpenAI's or Cohere's shape), documented headers are present, and a method a route lacks gets 405.
Bounded: a fixed number of examples per operation, no shrinking deadline.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
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

    return schemathesis.openapi.from_asgi("/docs/openapi.json", without_lifespan)


def test_schema_documents_errors_security_and_required_inputs(app):
    import json

    doc = json.loads(json.dumps(app.openapi_schema.to_schema()))  # what /docs/openapi.json serves
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    assert {"400", "401", "404", "413", "415", "429", "500", "503"} <= set(embeddings["responses"])
    assert "error" in embeddings["responses"]["400"]["content"]["application/json"]["schema"]["properties"]
    cohere = doc["paths"]["/v2/embed"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert cohere["required"] == ["message"] and "error" not in cohere["properties"]
    assert doc["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    request = next(v for k, v in doc["components"]["schemas"].items() if k.endswith("OpenAIEmbeddingRequest"))
    assert request["anyOf"] == [{"required": ["input"]}, {"required": ["messages"]}]
    assert "null" not in str(request["properties"]["input"])
    assert request["properties"]["encoding_format"]["enum"] == ["float", "base64", "bytes", "bytes_only"]


@pytest.mark.parametrize("method_path", ["POST /v1/embeddings", "POST /v2/embed", "POST /v1/score", "POST /tokenize",
                                         "POST /detokenize", "GET /v1/models", "GET /tokenizer_info", "GET /ready",
                                         "POST /embed", "POST /embed_all", "POST /v1/rerank", "POST /v2/rerank",
                                         "POST /pooling", "POST /embedding"])
def test_fuzz_against_the_schema(app, method_path):
    method, path = method_path.split()
    operation = _schema(app)[path][method]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case):
        for headers in ({"Authorization": "Bearer fuzz-key"}, {}):  # with the key, and without (401)
            case.call_and_validate(headers=headers, checks=CHECKS)

    check()
