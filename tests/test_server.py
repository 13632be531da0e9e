"""Server: routes through Litestar's test client, then a real `toolkit serve` driven by the openai and cohere clients."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import async_app_client, serve_subprocess
from litestar.testing import AsyncTestClient

from toolkit.runtime import Embedder
from toolkit.server.app import create_app, load_models
from toolkit.server.metrics import Metrics
from toolkit.settings import RuntimeOptions, ServerOptions


def _client(tiny_artifact):
    """The tiny model served with small limits and request chat templates allowed (an AsyncTestClient: use it
    in ``async with``)."""
    return async_app_client(tiny_artifact, max_client_batch_size=8, max_request_tokens=400, payload_limit=20_000,
                            allow_request_chat_template=True)


@pytest.mark.anyio
async def test_openai_float_base64_bytes(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        texts = ["hello there", "general kenobi"]
        r = await client.post("/v1/embeddings", json={"input": texts, "model": "tiny", "additional_data": {"k": 1}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["id"].startswith("embd-") and body["additional_data"] == {"k": 1}
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, tiny.embed(texts), atol=1e-6)
        assert body["usage"]["prompt_tokens"] == tiny.count_tokens(texts)
        assert float(r.headers["x-total-time"]) >= 0 and "x-inference-time" in r.headers
        r = await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64", "dimensions": 8})
        vec = np.frombuffer(base64.b64decode(r.json()["data"][1]["embedding"]), dtype=np.float32)
        np.testing.assert_allclose(vec, tiny.embed(texts[1], dimensions=8)[0], atol=1e-6)
        r = await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "bytes", "embed_dtype": "float16",
                                                      "endianness": "little"})
        assert r.headers["content-type"] == "application/octet-stream"
        meta = __import__("json").loads(r.headers["metadata"])  # vLLM's layout: everything per item
        assert set(meta) == {"id", "created", "model", "data", "usage"} and meta["usage"]["completion_tokens"] == 0
        assert meta["data"][1] == {"index": 1, "embed_dtype": "float16", "endianness": "little", "start": 48, "end": 96,
                                   "shape": [24]}
        np.testing.assert_allclose(np.frombuffer(r.content, dtype="<f2").reshape(2, 24), tiny.embed(texts), atol=1e-3)
        only = await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "bytes_only", "embed_dtype": "fp8_e4m3"})
        assert "metadata" not in only.headers and len(only.content) == 2 * 24
        from toolkit.runtime.encoding import to_fp8

        assert only.content == to_fp8(tiny.embed(texts), "fp8_e4m3").tobytes()
        r = await client.post("/v1/embeddings", json={"input": tiny.tokenize("hello there"), "use_activation": False})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], tiny.embed("hello there", normalize=False)[0], atol=1e-6)


@pytest.mark.anyio
@pytest.mark.parametrize("body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["ok", 3]}, 400, "input"),
    ({"input": "x", "encoding_format": "floats"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 7}, 400, "dimensions"),
    ({"input": "x", "model": "nope"}, 404, "model"),
    ({"input": ["x"] * 9}, 400, "input"),
    ({"input": "word " * 300}, 400, "input"),
    ({"input": ["word " * 90] * 5, "truncate_prompt_tokens": -1}, 400, "input"),
    ({"input": [[1, 2, 10**7]]}, 400, "input"),
    ({"input": "x", "truncation_side": "middle"}, 400, "truncation_side"),
    ({"input": "x", "embed_dtype": "int4"}, 400, "embed_dtype"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),  # tiny BERT has no chat template
    ({"messages": [{"role": "user"}], "chat_template": "{{ messages }}"}, 400, "messages"),
    ({"messages": [], "chat_template": "{{ messages }}"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "input": "x"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% if %}"}, 400, "chat_template"),
    ({"input": "x", "dimensions": "eight"}, 400, None),
])
async def test_openai_errors_have_openai_shape(tiny_artifact, body, status, param):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"] and error["type"] and error["code"] == status
        if param:
            assert error["param"] == param


@pytest.mark.anyio
async def test_chat_messages_on_a_model_with_a_template(tiny_decoder_artifact):
    registry = load_models([tiny_decoder_artifact], ["qwen3-tiny"], RuntimeOptions(device="cpu"), Metrics())
    emb = Embedder(tiny_decoder_artifact, device="cpu")
    messages = [{"role": "user", "content": "What is ONNX?"}, {"role": "assistant", "content": "A graph format."}]
    async with AsyncTestClient(create_app(registry, ServerOptions(), Metrics())) as c:
        r = await c.post("/v1/embeddings", json={"messages": messages, "add_generation_prompt": True})
        assert r.status_code == 200, r.text
        text = emb.render_chat(messages, add_generation_prompt=True)
        expected = emb.embed([text], add_special_tokens=False)
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected[0], atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] == len(emb.tokenize(text, add_special_tokens=False))
        r = await c.post("/tokenize", json={"messages": messages, "continue_final_message": True})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == emb.tokenize(emb.render_chat(messages, continue_final_message=True),
                                                   add_special_tokens=False)
        r = await c.post("/v1/embeddings", json={"messages": messages, "add_generation_prompt": True,
                                                 "continue_final_message": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


@pytest.mark.anyio
async def test_malformed_and_oversized_bodies(tiny_artifact):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", content=b'{"input": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await client.post("/v2/embed", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"message"}
        r = await client.post("/v1/embeddings", json={"input": "x" * 30_000})
        assert r.status_code == 413 and "payload limit" in r.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200  # still alive


@pytest.mark.anyio
async def test_cohere_embed_types_and_input_type(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v2/embed", json={"texts": ["hello there"], "input_type": "search_query",
                                                 "embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["response_type"] == "embeddings_by_type" and body["meta"]["api_version"]["version"] == "2"
        expected = tiny.embed("hello there", prompt_name="query")[0]  # search_query -> the card's query prompt
        np.testing.assert_allclose(body["embeddings"]["float"][0], expected, atol=1e-6)
        ubinary = np.array(body["embeddings"]["ubinary"][0])
        assert ubinary.tolist() == np.packbits(expected > 0).tolist()
        assert (np.array(body["embeddings"]["binary"][0]) == ubinary - 128).all()
        assert (np.array(body["embeddings"]["int8"][0]) == np.array(body["embeddings"]["uint8"][0]) - 128).all()
        assert body["meta"]["billed_units"]["input_tokens"] == tiny.count_tokens("hello there", prompt_name="query")
        r = await client.post("/v2/embed", json={"inputs": [{"content": [{"type": "text", "text": "hello there"}]}],
                                                 "output_dimension": 16})
        assert len(r.json()["embeddings"]["float"][0]) == 16


@pytest.mark.anyio
@pytest.mark.parametrize("body", [
    {"texts": ["x"], "input_type": "qury"},
    {"texts": ["x"], "embedding_types": ["int4"]},
    {"texts": ["x"], "truncate": "MIDDLE"},
    {"texts": ["word " * 300], "truncate": "NONE"},
    {"texts": []},
    {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]},
    {"images": ["data:image/png;base64,AAAA"]},
    {"texts": ["x"], "model": "nope"},
])
async def test_cohere_errors_have_cohere_shape(tiny_artifact, body):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v2/embed", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert set(r.json()) == {"message"} and r.json()["message"]


_IMAGE = "data:image/png;base64,AAAA"
_IMAGE_PART = {"type": "image_url", "image_url": {"url": _IMAGE}}


@pytest.mark.anyio
@pytest.mark.parametrize(("route", "body", "where"), [
    ("/v1/embeddings", {"input": _IMAGE, "modality": "image"}, "input[0]"),
    ("/v1/embeddings", {"input": [{"text": "a text"}, {"image": _IMAGE}]}, "input[1]"),
    ("/v1/embeddings", {"messages": [{"role": "user", "content": [_IMAGE_PART]}]}, "messages"),
    ("/v2/embed", {"images": [_IMAGE]}, "images[0]"),
    ("/v2/embed", {"inputs": [{"content": [{"type": "text", "text": "a"}]}, {"content": [_IMAGE_PART]}]}, "inputs[1]"),
])
async def test_content_of_a_modality_the_artifact_lacks_is_refused_in_one_voice(tiny_artifact, route, body, where):
    """Every dialect parses its content parts; one router refuses what the artifact's encoders do not read,
    naming the input and the modalities it does read, in the dialect's own error shape."""
    async with _client(tiny_artifact) as client:
        r = await client.post(route, json=body)
        assert r.status_code == 400, r.text
        message = r.json()["message"] if route == "/v2/embed" else r.json()["error"]["message"]
        assert message == f"{where} is image content: this dense embedding artifact reads text only", message
        assert (await client.post(route, json={"texts": ["still fine"]} if route == "/v2/embed"
                                  else {"input": "still fine"})).status_code == 200


@pytest.mark.anyio
async def test_score_tokenize_models_metrics(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/score", json={"text_1": "hello", "text_2": ["hello", "bye"]})
        scores = [d["score"] for d in r.json()["data"]]
        np.testing.assert_allclose(scores, tiny.score("hello", ["hello", "bye"]), atol=1e-5)
        assert (await client.post("/score", json={"text_1": ["a", "b"], "text_2": ["a", "b"]})).status_code == 200
        assert (await client.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["a", "b", "c"]})).status_code == 400
        r = await client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
        assert r.json()["tokens"] == tiny.tokenize("hello world") and r.json()["count"] == len(r.json()["token_strs"])
        r = await client.post("/detokenize", json={"tokens": r.json()["tokens"]})
        assert "hello" in r.json()["prompt"]
        assert (await client.post("/detokenize", json={"tokens": [10**8]})).status_code == 400
        model = (await client.get("/v1/models")).json()["data"][0]
        assert model["id"] == "tiny" and model["dimensions"] == 24 and model["matryoshka_dimensions"] == [8, 16]
        assert (await client.get("/ready")).json()["status"] == "ready"
        text = (await client.get("/metrics")).text
        for name in ("toolkit_requests_total", "toolkit_queue_depth", "toolkit_batch_size_bucket",
                     "toolkit_inference_duration_seconds_bucket", "toolkit_input_tokens_total"):
            assert name in text
        assert (await client.get("/docs/openapi.json")).json()["paths"]["/v1/embeddings"]


@pytest.mark.anyio
async def test_ready_notices_a_dead_backend(tiny_artifact):
    metrics = Metrics()
    registry = load_models([tiny_artifact], [], RuntimeOptions(device="cpu"), metrics)
    async with AsyncTestClient(create_app(registry, ServerOptions(), metrics)) as c:
        assert (await c.get("/ready")).status_code == 200
        next(iter(registry.models.values())).engine.close()
        r = await c.get("/ready")
        assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
        assert (await c.post("/v1/embeddings", json={"input": "x"})).status_code == 503
        assert (await c.get("/health")).status_code == 200


@pytest.mark.anyio
async def test_api_key(tiny_artifact):
    registry = load_models([tiny_artifact], [], RuntimeOptions(device="cpu"), Metrics())
    async with AsyncTestClient(create_app(registry, ServerOptions(api_key="s3cret"))) as c:
        assert (await c.post("/v1/embeddings", json={"input": "x"})).status_code == 401
        assert (await c.post("/v2/embed", json={"texts": ["x"]}, headers={"Authorization": "Bearer nope"})).json().keys() == {"message"}
        assert (await c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await c.get("/health")).status_code == 200 and (await c.get("/metrics")).status_code == 200


# ------------------------------------------------------------------ end to end, real process
@pytest.fixture(scope="module")
def live_server(minilm_artifact):
    url, _, proc = serve_subprocess(minilm_artifact, env={"TOOLKIT_API_KEY": "e2e-key"})
    yield url, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def minilm(minilm_artifact):
    return Embedder(minilm_artifact, device="cpu")


def test_openai_client_float_and_base64(live_server, minilm):
    from openai import OpenAI

    url, _ = live_server
    client = OpenAI(base_url=url + "/v1", api_key="e2e-key")
    texts = ["How do I export a model?", "ONNX Runtime runs it fast."]
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    expected = minilm.embed(texts)
    for response in (default, as_float):
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected, atol=1e-5)
    assert as_float.usage.prompt_tokens == minilm.count_tokens(texts)
    from openai import AuthenticationError, BadRequestError, NotFoundError

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong").embeddings.create(model="all-MiniLM-L6-v2", input="x")
    with pytest.raises(NotFoundError, match="served: all-MiniLM-L6-v2"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(BadRequestError, match="dimensions"):
        client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=100)


def test_cohere_client(live_server, minilm):
    import cohere

    url, _ = live_server
    co = cohere.ClientV2(api_key="e2e-key", base_url=url)
    texts = ["a document about ONNX", "another one"]
    response = co.embed(texts=texts, model="all-MiniLM-L6-v2", input_type="search_document",
                        embedding_types=["float", "int8", "ubinary"])
    np.testing.assert_allclose(np.array(response.embeddings.float_), minilm.embed(texts), atol=1e-5)
    assert len(response.embeddings.int8[0]) == 384 and len(response.embeddings.ubinary[0]) == 48
    with pytest.raises(Exception, match="input_type"):
        co.embed(texts=texts, model="all-MiniLM-L6-v2", input_type="querry", embedding_types=["float"])


def test_concurrent_clients_match_solo(live_server, minilm):
    """32 clients x 8 requests (bounded), every response equal to its solo embedding."""
    url, _ = live_server
    texts = [f"sentence number {i} about batching and padding" + " more" * (i % 7) for i in range(256)]
    expected = minilm.embed(texts)
    headers = {"Authorization": "Bearer e2e-key"}

    def worker(k: int) -> list[tuple[int, int, list[float]]]:
        out = []
        with httpx.Client(timeout=60) as http:
            for i in range(k * 8, k * 8 + 8):
                r = http.post(url + "/v1/embeddings", json={"input": texts[i], "encoding_format": "float"}, headers=headers)
                out.append((i, r.status_code, r.json()["data"][0]["embedding"] if r.status_code == 200 else None))
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [row for rows in pool.map(worker, range(32)) for row in rows]
    assert all(status == 200 for _, status, _ in results)
    for i, _, vector in results:
        np.testing.assert_allclose(vector, expected[i], atol=1e-5)


def test_bench_drives_the_server(live_server, minilm_artifact, monkeypatch, tmp_path):
    from toolkit import bench
    from toolkit.errors import ConfigError

    url, _ = live_server
    monkeypatch.setenv("TOOLKIT_API_KEY", "e2e-key")
    result = bench.bench_server(url, artifact=minilm_artifact, corpus=None, concurrency=(1, 4), requests=24,
                                inputs_per_request=2, threads=None)
    assert [r["concurrency"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["requests"] == 24 and row["errors"] == 0
        assert row["sentences_per_s"] == pytest.approx(2 * row["requests_per_s"])
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["ratio_vs_inprocess_bs32"] > 0 and row["p50_vs_inprocess_bs1"] > 0
    bench.print_result(result)
    bench.plot_result(result, tmp_path / "server.png")
    assert (tmp_path / "server.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="401.*--api-key"):  # a run of 401s is an error, not a fast result
        bench.bench_server(url, artifact=None, corpus=None, concurrency=(2,), requests=4,
                           inputs_per_request=1, threads=None, api_key="wrong")
    with pytest.raises(ConfigError, match="loopback"):
        bench.bench_server("http://example.com:80", artifact=None, corpus=None, concurrency=(1,), requests=1,
                           inputs_per_request=1, threads=None)


def test_cohere_client_rerank(live_server, minilm):
    import cohere

    url, _ = live_server
    co = cohere.ClientV2(api_key="e2e-key", base_url=url)
    documents = ["ONNX Runtime executes graphs fast", "the weather is sunny today", "export a model to ONNX"]
    response = co.rerank(model="all-MiniLM-L6-v2", query="how do I run an ONNX graph", documents=documents, top_n=2)
    scores = minilm.score("how do I run an ONNX graph", documents)
    assert [r.index for r in response.results] == np.argsort(-scores)[:2].tolist()
    np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(scores)[::-1][:2], atol=1e-5)


def test_sigterm_exits_cleanly(live_server):
    url, proc = live_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_serve_bad_artifact_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "no such artifact" in done.stderr

