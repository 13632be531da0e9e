"""Request faults every route names the same way: an unknown `model` in each dialect's shape and status, and
token-id inputs that are not integers (through Litestar's test client, two tiny models served)."""

from __future__ import annotations

import pytest
from conftest import app_client

TEI_ROUTES = [("/embed", {"inputs": "x"}), ("/embed_all", {"inputs": "x"}), ("/embed_sparse", {"inputs": "x"}),
              ("/rerank", {"query": "q", "texts": ["a"]})]


@pytest.fixture(scope="module")
def client(tiny_artifact):
    with app_client([tiny_artifact, tiny_artifact], ["a", "b"]) as c:
        yield c


@pytest.mark.parametrize("path, body", TEI_ROUTES)
def test_an_unknown_model_on_tei_routes_is_tei_validation(client, path, body):
    # TEI has no 404 (its error types map to 503, 424, 429, 422, 413, 400): a bad `model` is bad input there
    for model, says in (("nope", "model 'nope' is not served here; served: a, b"),
                        (None, "several models are served; name one of: a, b")):
        r = client.post(path, json={**body, **({"model": model} if model else {})})
        assert r.status_code == 422, r.text
        assert r.json() == {"error": says, "error_type": "Validation"}


def test_an_unknown_model_elsewhere_stays_404_in_each_shape(client):
    r = client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert r.json()["error"]["param"] == "model"
    r = client.post("/v2/embed", json={"texts": ["x"], "input_type": "query", "model": "nope"})
    assert r.status_code == 404 and r.json() == {"message": "model 'nope' is not served here; served: a, b"}
    r = client.post("/rerank", json={"query": "q", "documents": ["a"], "model": "nope"})  # vLLM's body and route
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"  # vLLM's exception name


def test_vllms_routes_name_vllms_exception(client):
    """vLLM's own routes answer OpenAI's shape with vLLM's `type` (what vLLM's server and its tests check);
    OpenAI's route keeps OpenAI's."""
    for route, body in (("/pooling", {"input": "x", "task": "nope"}), ("/score", {"text_1": "a"}),
                        ("/v1/rerank", {"query": "", "documents": ["a"]}), ("/tokenize", {}),
                        ("/detokenize", {"tokens": [10**9]}), ("/invocations", {"nothing": 1})):
        r = client.post(route, json={**body, "model": "a"})  # two models are served here
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError", (route, r.text)
        assert r.json()["error"]["code"] == 400 and r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": [], "model": "a"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/tokenize", json={"inputs": [], "model": "a"})  # TEI's body on the shared path: TEI's shape
    assert set(r.json()) == {"error", "error_type"}


@pytest.mark.parametrize("nested, got", [(["a"], "a string ('a')"), ([1, 2.5], "a number (2.5)"),
                                         ([True], "a boolean (true)"), ([[1]], "a list"), ([None], "null")])
def test_a_nested_list_must_be_token_ids(client, nested, got):
    fault = f"a nested list must be token ids (integers); got {got} at "
    for path, body in (("/v1/embeddings", {"input": [nested]}), ("/pooling", {"input": [nested]}),
                       ("/embedding", {"content": [nested]})):
        r = client.post(path, json={**body, "model": "a"})
        assert r.status_code == 400, r.text
        assert fault in r.json()["error"]["message"] and r.json()["error"]["param"] == "input"
    r = client.post("/embed", json={"inputs": [nested], "model": "a"})  # TEI's `inputs`, TEI's shape
    assert r.status_code == 422 and fault in r.json()["error"] and r.json()["error_type"] == "Validation"
    # still a vocabulary fault when it is one
    r = client.post("/v1/embeddings", json={"input": [[1, 10**9]], "model": "a"})
    assert r.status_code == 400 and "token id 1000000000" in r.json()["error"]["message"]
    assert "outside the vocabulary" in r.json()["error"]["message"]
