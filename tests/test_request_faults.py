"""Request faults every route names the same way: an unknown `model` in each dialect's shape and status, and
token-id inputs that are not integers (through Litestar's test client, two tiny models served)."""

from __future__ import annotations

import pytest
from conftest import async_app_client

TEI_ROUTES = [("/embed", {"inputs": "x"}), ("/embed_all", {"inputs": "x"}), ("/embed_sparse", {"inputs": "x"}),
              ("/rerank", {"query": "q", "texts": ["a"]})]


def _client(tiny_artifact):
    """The tiny model served twice, as "a" and "b" (an AsyncTestClient: use it in ``async with``)."""
    return async_app_client([tiny_artifact, tiny_artifact], ["a", "b"])


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", TEI_ROUTES)
async def test_an_unknown_model_on_tei_routes_is_tei_validation(tiny_artifact, path, body):
    # TEI has no 404 (its error types map to 503, 424, 429, 422, 413, 400): a bad `model` is bad input there
    async with _client(tiny_artifact) as client:
        for model, says in (("nope", "model 'nope' is not served here; served: a, b"),
                            (None, "several models are served; name one of: a, b")):
            r = await client.post(path, json={**body, **({"model": model} if model else {})})
            assert r.status_code == 422, r.text
            assert r.json() == {"error": says, "error_type": "Validation"}


@pytest.mark.anyio
async def test_an_unknown_model_elsewhere_stays_404_in_each_shape(tiny_artifact):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert r.json()["error"]["param"] == "model"
        r = await client.post("/v2/embed", json={"texts": ["x"], "input_type": "query", "model": "nope"})
        assert r.status_code == 404 and r.json() == {"message": "model 'nope' is not served here; served: a, b"}
        r = await client.post("/rerank", json={"query": "q", "documents": ["a"], "model": "nope"})  # vLLM's body and route
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"  # vLLM's exception name


@pytest.mark.anyio
async def test_vllms_routes_name_vllms_exception(tiny_artifact):
    """vLLM's own routes answer OpenAI's shape with vLLM's `type` (what vLLM's server and its tests check);
    OpenAI's route keeps OpenAI's."""
    async with _client(tiny_artifact) as client:
        for route, body in (("/pooling", {"input": "x", "task": "nope"}), ("/score", {"text_1": "a"}),
                            ("/v1/rerank", {"query": "", "documents": ["a"]}), ("/tokenize", {}),
                            ("/detokenize", {"tokens": [10**9]}), ("/invocations", {"nothing": 1})):
            r = await client.post(route, json={**body, "model": "a"})  # two models are served here
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError", (route, r.text)
            assert r.json()["error"]["code"] == 400 and r.json()["error"]["message"]
        r = await client.post("/v1/embeddings", json={"input": [], "model": "a"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/tokenize", json={"inputs": [], "model": "a"})  # TEI's body on the shared path: TEI's shape
        assert set(r.json()) == {"error", "error_type"}


@pytest.mark.anyio
@pytest.mark.parametrize("nested, got", [(["a"], "a string ('a')"), ([1, 2.5], "a number (2.5)"),
                                         ([True], "a boolean (true)"), ([[1]], "a list"), ([None], "null")])
async def test_a_nested_list_must_be_token_ids(tiny_artifact, nested, got):
    async with _client(tiny_artifact) as client:
        fault = f"a nested list must be token ids (integers); got {got} at "
        for path, body in (("/v1/embeddings", {"input": [nested]}), ("/pooling", {"input": [nested]}),
                           ("/embedding", {"content": [nested]})):
            r = await client.post(path, json={**body, "model": "a"})
            assert r.status_code == 400, r.text
            assert fault in r.json()["error"]["message"] and r.json()["error"]["param"] == "input"
        r = await client.post("/embed", json={"inputs": [nested], "model": "a"})  # TEI's `inputs`, TEI's shape
        assert r.status_code == 422 and fault in r.json()["error"] and r.json()["error_type"] == "Validation"
        # still a vocabulary fault when it is one
        r = await client.post("/v1/embeddings", json={"input": [[1, 10**9]], "model": "a"})
        assert r.status_code == 400 and "token id 1000000000" in r.json()["error"]["message"]
        assert "outside the vocabulary" in r.json()["error"]["message"]
