"""TEI's routes, reranking (vLLM / Jina / Cohere / TEI bodies), vLLM's /pooling and llama.cpp's /embedding."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import async_app_client

from toolkit.runtime import Embedder

DOCS = ["ONNX Runtime executes graphs fast", "the weather is sunny today", "export a model to ONNX"]
QUERY = "how do I run an ONNX graph"


def _client(tiny_artifact):
    """The tiny model served as "m", for ``async with``."""
    return async_app_client(tiny_artifact, ["m"])


def _cosines(emb: Embedder, query: str, docs: list[str]) -> np.ndarray:
    return emb.score(query, docs)


@pytest.mark.anyio
async def test_tei_embed_and_embed_all(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/embed", json={"inputs": ["hello there", "general kenobi"]})
        assert r.status_code == 200 and "x-compute-tokens" in r.headers
        np.testing.assert_allclose(r.json(), tiny.embed(["hello there", "general kenobi"]), atol=1e-6)
        r = await client.post("/embed", json={"inputs": "hello there", "normalize": False, "dimensions": 8})
        np.testing.assert_allclose(r.json(), tiny.embed("hello there", normalize=False, dimensions=8), atol=1e-6)
        r = await client.post("/embed", json={"inputs": "hello", "prompt_name": "query"})
        np.testing.assert_allclose(r.json(), tiny.embed("hello", prompt_name="query"), atol=1e-6)
        long = "word " * 500
        r = await client.post("/embed", json={"inputs": long})  # TEI: truncate defaults to false, too long is 413 validation
        assert r.status_code == 413 and r.json()["error_type"] == "Validation" and set(r.json()) == {"error", "error_type"}
        r = await client.post("/embed", json={"inputs": long, "truncate": True, "truncation_direction": "Left"})
        np.testing.assert_allclose(r.json(), tiny.embed(long, truncate_prompt_tokens=-1, truncation_side="left"), atol=1e-6)
        r = await client.post("/embed_all", json={"inputs": ["hello there"]})
        np.testing.assert_allclose(np.array(r.json()[0]), tiny.encode(["hello there"], pooling_task="token_embed")[0],
                                   atol=1e-5)


@pytest.mark.parametrize("body, status", [
    ({"inputs": []}, 422), ({"inputs": "x", "truncation_direction": "Middle"}, 422), ({"nope": 1}, 422),
    ({"inputs": "x", "dimensions": 0}, 422), ({"inputs": "x", "dimensions": 25}, 422),  # TEI: any size up to 24
])
@pytest.mark.anyio
async def test_tei_errors_have_tei_shape(tiny_artifact, body, status):
    async with _client(tiny_artifact) as client:
        r = await client.post("/embed", json=body)
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "error_type"} and r.json()["error"]
        r = await client.post("/embed_sparse", json={"inputs": "x"})  # a dense artifact
        assert r.status_code == 422 and "does not answer 'embed_sparse'" in r.json()["error"]


@pytest.mark.anyio
async def test_tei_embed_sparse_on_splade(splade_artifact):
    emb = Embedder(splade_artifact, device="cpu")
    async with async_app_client(splade_artifact, ["m"]) as c:
        r = await c.post("/embed_sparse", json={"inputs": ["what is sparse retrieval"]})
        assert r.status_code == 200, r.text
        ((idx, val),) = emb.embed_sparse(["what is sparse retrieval"])
        assert [e["index"] for e in r.json()[0]] == idx.tolist()
        np.testing.assert_allclose([e["value"] for e in r.json()[0]], val, atol=1e-6)
        r = await c.post("/pooling", json={"input": "what is sparse retrieval"})
        dense = np.array(r.json()["data"][0]["data"])
        assert dense.shape == (30522,) and np.flatnonzero(dense).tolist() == idx.tolist()
        r = await c.post("/pooling", json={"input": "x", "task": "token_embed"})
        assert r.status_code == 400 and "this model answers: embed;" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_rerank_dialects(tiny_artifact, tiny):
    scores = _cosines(tiny, QUERY, DOCS)
    best_first = np.argsort(-scores).tolist()
    async with _client(tiny_artifact) as client:
        r = await client.post("/rerank", json={"query": QUERY, "documents": DOCS})  # vLLM / Jina body
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == best_first and results[0]["document"]["text"] == DOCS[best_first[0]]
        np.testing.assert_allclose([x["relevance_score"] for x in results], scores[best_first], atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] == tiny.count_tokens([QUERY, *DOCS])
        r = await client.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2})
        assert [x["index"] for x in r.json()["results"]] == best_first[:2]
        r = await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 4096})
        assert "document" not in r.json()["results"][0] and r.json()["meta"]["billed_units"]["search_units"] == 1
        r = await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})  # TEI body
        assert [x["index"] for x in r.json()] == best_first and r.json()[0]["text"] == DOCS[best_first[0]]
        for body in ({"query": QUERY}, {"query": QUERY, "texts": DOCS, "documents": DOCS}):
            r = await client.post("/rerank", json=body)
            assert r.status_code == 400 and "exactly one" in r.json()["error"]["message"]
        r = await client.post("/rerank", json={"query": QUERY, "texts": []})
        assert r.status_code == 422 and r.json()["error_type"] == "Validation"  # TEI's shape for TEI's body
        assert (await client.post("/v2/rerank", json={"query": "", "documents": DOCS})).json().keys() == {"message"}


@pytest.mark.anyio
async def test_rerank_max_tokens_per_doc_cuts_the_documents_not_the_query(tiny_artifact, tiny):
    """Cohere's and vLLM's max_tokens_per_doc on an embedding model: each document is cut to N tokens before it is
    embedded; the query is embedded whole (it was cut to N too)."""
    query = "which of these documents explain how to run an ONNX graph on a CPU with onnxruntime and numpy"
    docs = [d + " and then some more words about graphs, sessions, providers and threads" for d in DOCS]
    n = 5

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    expected = (unit(tiny.embed(docs, truncate_prompt_tokens=n)) @ unit(tiny.embed([query])).T)[:, 0]
    whole_query = tiny.count_tokens([query])
    assert whole_query > n and all(tiny.count_tokens([d]) > n for d in docs)
    async with _client(tiny_artifact) as client:
        for path in ("/v2/rerank", "/rerank"):
            r = await client.post(path, json={"query": query, "documents": docs, "max_tokens_per_doc": n})
            assert r.status_code == 200, r.text
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, atol=1e-5)
            assert r.json()["usage"]["prompt_tokens"] == whole_query + n * len(docs)  # the query's every token


@pytest.mark.anyio
async def test_pooling_and_llama_cpp(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/pooling", json={"input": ["hello there"], "task": "embed"})
        assert r.status_code == 200 and r.json()["data"][0]["object"] == "pooling"
        np.testing.assert_allclose(r.json()["data"][0]["data"], tiny.embed("hello there")[0], atol=1e-6)
        r = await client.post("/pooling", json={"input": "hello there", "task": "token_embed"})
        np.testing.assert_allclose(np.array(r.json()["data"][0]["data"]),
                                   tiny.encode("hello there", pooling_task="token_embed")[0], atol=1e-5)
        r = await client.post("/pooling", json={"input": "hello there", "encoding_format": "base64"})
        vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["data"]), dtype=np.float32)
        np.testing.assert_allclose(vec, tiny.embed("hello there")[0], atol=1e-6)
        for task in ("classify", "token_classify"):
            r = await client.post("/pooling", json={"input": "x", "task": task})
            assert r.status_code == 400 and "this model answers: embed, token_embed;" in r.json()["error"]["message"]
        assert (await client.post("/pooling", json={"input": "x", "task": "rank"})).json()["error"]["param"] == "task"
        r = await client.post("/embedding", json={"content": ["hello there", "bye"]})
        assert [x["index"] for x in r.json()] == [0, 1]
        np.testing.assert_allclose(r.json()[1]["embedding"][0], tiny.embed("bye")[0], atol=1e-6)
        info = (await client.get("/info")).json()
        assert info["model_id"] == "m" and info["max_input_length"] == tiny.tokenizer.max_length
