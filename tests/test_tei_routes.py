"""TEI's whole route set, as its clients call it: ``huggingface_hub.InferenceClient`` pointed at a live server
(it posts to the URL itself), ``GET /`` and ``/ping``, ``/embeddings``, ``/similarity``, ``/decode``, TEI's
``/tokenize`` body, ``/embed``'s any-size ``dimensions``, and ``/invocations`` / ``POST /`` dispatch."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import async_app_client, serve_subprocess


@pytest.fixture(scope="module")
def live(tiny_artifact):
    url, _, proc = serve_subprocess(tiny_artifact, "--served-model-name", "tiny")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_inference_client_feature_extraction_and_similarity(live, tiny, inference_client):
    client = inference_client(live)
    vectors = client.feature_extraction("hello there")
    np.testing.assert_allclose(np.asarray(vectors).reshape(-1), tiny.embed("hello there")[0], atol=1e-5)
    vectors = client.feature_extraction("hello there", prompt_name="query", normalize=False)
    np.testing.assert_allclose(np.asarray(vectors).reshape(-1),
                               tiny.embed("hello there", prompt_name="query", normalize=False)[0], atol=1e-5)
    scores = client.sentence_similarity("a cat sat", other_sentences=["a cat sat", "stock markets fell"])
    np.testing.assert_allclose(scores, tiny.score("a cat sat", ["a cat sat", "stock markets fell"]), atol=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)


def test_probes_and_the_unversioned_openai_route(live, tiny):
    for path in ("/", "/ping"):
        r = httpx.get(live + path)
        assert r.status_code == 200 and r.text == ""
    r = httpx.post(live + "/embeddings", json={"input": ["hello"]})
    assert r.status_code == 200 and r.json()["object"] == "list"
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], tiny.embed("hello")[0], atol=1e-5)


@pytest.mark.anyio
async def test_tokenize_and_decode_in_teis_shape(tiny_artifact, tiny):
    async with async_app_client(tiny_artifact) as client:
        r = await client.post("/tokenize", json={"inputs": "héllo wörld"})
        assert r.status_code == 200, r.text
        (tokens,) = r.json()
        assert [t["id"] for t in tokens] == tiny.tokenize("héllo wörld")
        first, last = tokens[0], tokens[-1]
        assert first["special"] and first["start"] is None and first["text"] == tiny.tokenizer.token_strings([first["id"]])[0]
        assert last["special"]
        text = "héllo wörld".encode()
        for token in tokens[1:-1]:  # byte offsets, as TEI's Rust tokenizer counts them
            assert not token["special"]
            assert text[token["start"]:token["stop"]].decode() == token["text"]
        r = await client.post("/tokenize", json={"inputs": ["a", "b c"], "add_special_tokens": False})
        assert [len(x) for x in r.json()] == [1, 2]
        prompted = (await client.post("/tokenize", json={"inputs": "a", "prompt_name": "query"})).json()[0]
        assert [t["id"] for t in prompted] == tiny.tokenize("query: a")
        vllm = await client.post("/tokenize", json={"prompt": "a b"})  # vLLM's body keeps vLLM's answer
        assert vllm.json()["tokens"] == tiny.tokenize("a b")
        r = await client.post("/decode", json={"ids": tiny.tokenize("hello world")})
        assert r.json() == ["hello world"]
        r = await client.post("/decode", json={"ids": [tiny.tokenize("a"), tiny.tokenize("b")], "skip_special_tokens": False})
        assert r.json()[0].startswith("[CLS]") and len(r.json()) == 2
        for bad in ({"ids": []}, {"ids": [[]]}, {"ids": [10**9]}):
            r = await client.post("/decode", json=bad)
            assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "error_type"}, r.text
        r = await client.post("/tokenize", json={"inputs": []})
        assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "error_type"}


@pytest.mark.anyio
async def test_embed_dimensions_as_tei_and_vllm_each_do(tiny_artifact, tiny):
    raw = tiny.embed("hello", normalize=False)[0]
    async with async_app_client(tiny_artifact) as client:
        r = await client.post("/embed", json={"inputs": "hello", "dimensions": 10})  # not a declared Matryoshka size
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()[0], raw[:10] / np.linalg.norm(raw[:10]), atol=1e-5)
        r = await client.post("/embed", json={"inputs": "hello", "dimensions": 10, "normalize": False})
        np.testing.assert_allclose(r.json()[0], raw[:10], atol=1e-5)
        for bad in (0, 25):
            r = await client.post("/embed", json={"inputs": "hello", "dimensions": bad})
            assert r.status_code == 422 and r.json()["error_type"] == "Validation", r.text
        r = await client.post("/v1/embeddings", json={"input": "hello", "dimensions": 10})  # vLLM: declared sizes only
        assert r.status_code == 400 and "allowed: 8, 16, 24" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_post_root_and_invocations_dispatch_as_tei_does(tiny_artifact, splade_artifact, cross_encoder_artifact, tiny):
    async with async_app_client(tiny_artifact) as client:
        r = await client.post("/", json={"inputs": ["hello"], "normalize": True})
        np.testing.assert_allclose(r.json()[0], tiny.embed("hello")[0], atol=1e-5)
        r = await client.post("/", json={"inputs": {"source_sentence": "a", "sentences": ["a", "b"]}})
        np.testing.assert_allclose(r.json(), tiny.score("a", ["a", "b"]), atol=1e-5)
        r = await client.post("/invocations", json={"query": "a", "documents": ["a", "zzz"]})  # vLLM's rerank body
        assert r.status_code == 200 and r.json()["results"][0]["index"] == 0
        r = await client.post("/invocations", json={"inputs": "hello"})  # TEI's body
        np.testing.assert_allclose(r.json()[0], tiny.embed("hello")[0], atol=1e-5)
        r = await client.post("/", json={"input": "hello"})  # a vLLM body on / is dispatched like /invocations
        assert r.status_code == 200 and r.json()["data"][0]["index"] == 0
        r = await client.post("/", json={"inputs": {"source_sentence": "a", "sentences": []}})
        assert r.status_code == 422 and "cannot be empty" in r.json()["error"]
    async with async_app_client(splade_artifact, ["splade"]) as client:
        r = await client.post("/", json={"inputs": "hello world"})
        assert r.status_code == 200 and {"index", "value"} == set(r.json()[0][0])
    async with async_app_client(cross_encoder_artifact, ["ce"]) as client:
        r = await client.post("/", json={"query": "a", "texts": ["a b", "c"]})
        assert r.status_code == 200 and {"index", "score"} <= set(r.json()[0])
        r = await client.post("/", json={"inputs": "hello"})
        assert r.status_code == 422 and "ranks a query" in r.json()["error"]


@pytest.mark.anyio
async def test_probes_need_no_key_but_the_entry_point_does(tiny_artifact):
    async with async_app_client(tiny_artifact, api_key="k") as client:
        assert (await client.get("/")).status_code == 200 and (await client.get("/ping")).status_code == 200
        assert (await client.post("/", json={"inputs": "x"})).status_code == 401
        assert (await client.post("/", json={"inputs": "x"}, headers={"Authorization": "Bearer k"})).status_code == 200
