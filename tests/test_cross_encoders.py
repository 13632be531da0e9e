"""Cross-encoders (rerankers): export with parity against sentence-transformers' CrossEncoder, scoring and
reranking in Python, and every rerank/score dialect over HTTP (the official cohere client included)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import _export
from litestar.testing import TestClient
from tiny_models import build_tiny_model

from toolkit.cards import Pooling
from toolkit.corpus import load_corpus
from toolkit.runtime import Embedder
from toolkit.server.app import create_app, load_models
from toolkit.server.metrics import Metrics
from toolkit.settings import RuntimeOptions, ServerOptions

QUERY = "how do I run an ONNX graph"
DOCS = ["ONNX Runtime executes graphs fast", "the weather is sunny today", "export a model to ONNX", "cats sleep"]


def _pairs_and_reference(folder, emb: Embedder):
    """Short and over-long documents, scored by CrossEncoder.predict (with and without its activation)."""
    import torch
    from sentence_transformers import CrossEncoder

    corpus = load_corpus(limit=300)
    documents = [*DOCS, " ".join(corpus[:120]), corpus[7]]  # one far past the window
    ce = CrossEncoder(str(folder), device="cpu", max_length=emb.manifest.max_seq_len)
    pairs = [(QUERY, d) for d in documents]
    return documents, ce.predict(pairs, batch_size=16), ce.predict(pairs, batch_size=16, activation_fn=torch.nn.Identity())


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta", "modernbert"])
def test_cross_encoder_export_matches_crossencoder_predict(model_type, tmp_path):
    folder = build_tiny_model(model_type, tmp_path / "m", classifier=True, config={"initializer_range": 0.2})
    result = _export(str(folder), tmp_path / "ce.onnx")
    manifest = result.manifest
    assert manifest.card.pooling.value == "rank" and manifest.card.activation == "sigmoid"
    assert manifest.outputs == ["logits"] and manifest.embedding_dim == 1
    parity = manifest.parity
    assert parity.passed and parity.reference == "sentence-transformers CrossEncoder"
    assert max(parity.max_abs_diff.values()) <= 1e-5, parity.max_abs_diff
    emb = Embedder(result.path, device="cpu")
    documents, expected, logits = _pairs_and_reference(folder, emb)
    got = emb.score(QUERY, documents, truncate_prompt_tokens=-1)  # batch of many, padded
    assert np.abs(got - expected).max() <= 1e-5
    alone = [emb.score(QUERY, d, truncate_prompt_tokens=-1)[0] for d in documents]  # batch 1 each
    assert np.abs(np.array(alone) - expected).max() <= 1e-5
    raw = emb.score(QUERY, documents, truncate_prompt_tokens=-1, use_activation=False)
    assert np.abs(raw - logits).max() <= 1e-5
    ranked = emb.rerank(QUERY, documents, top_n=3, return_documents=True, truncate_prompt_tokens=-1)
    assert [r["index"] for r in ranked] == np.argsort(-expected)[:3].tolist()
    assert ranked[0]["document"] == documents[ranked[0]["index"]]
    with pytest.raises(Exception, match="cross-encoder"):
        emb.embed("x")
    with pytest.raises(Exception, match="maximum"):
        emb.score(QUERY, documents)  # no truncation asked: an over-long pair is an error


def _declare_model_max_length(folder, length: int) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))


def test_truncation_where_the_reference_truncates(tmp_path):
    """The tokenizer says model_max_length 80 while the positions allow 96: CrossEncoder (and transformers'
    tokenizer) cut at 80, so the artifact does, and parity is checked with CrossEncoder at its own length."""
    import torch  # noqa: F401 - CrossEncoder's
    from sentence_transformers import CrossEncoder

    folder = build_tiny_model("bert", tmp_path / "m", classifier=True,
                              config={"initializer_range": 0.2, "max_position_embeddings": 96})
    _declare_model_max_length(folder, 80)
    result = _export(str(folder), tmp_path / "ce.onnx")
    assert result.manifest.max_seq_len == 80
    assert result.manifest.parity.passed and result.manifest.parity.reference == "sentence-transformers CrossEncoder"
    emb = Embedder(result.path, device="cpu")
    corpus = load_corpus(limit=300)
    documents = [" ".join(corpus[:60]), " ".join(corpus[60:90]), corpus[3]]  # past 80 and 96 tokens, and short
    expected = CrossEncoder(str(folder), device="cpu").predict([(QUERY, d) for d in documents])  # its own length
    got = emb.score(QUERY, documents, truncate_prompt_tokens=-1)
    assert np.abs(got - expected).max() <= 1e-5
    # an embedding model without sentence-transformers files: transformers' tokenizer cuts at its model_max_length
    plain = build_tiny_model("bert", tmp_path / "plain", config={"max_position_embeddings": 96})
    _declare_model_max_length(plain, 72)
    assert _export(str(plain), tmp_path / "plain.onnx", pooling=Pooling.MEAN).manifest.max_seq_len == 72


def test_token_type_ids_only_where_the_tokenizer_returns_them(tmp_path):
    """A BERT whose tokenizer returns no token type ids (model_input_names without them): transformers feeds none,
    so the second segment reads type 0; the artifact does the same, and scores pairs as CrossEncoder does."""
    from sentence_transformers import CrossEncoder

    folder = build_tiny_model("bert", tmp_path / "m", classifier=True, config={"initializer_range": 0.2})
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = _export(str(folder), tmp_path / "ce.onnx")
    assert result.manifest.inputs == ["input_ids", "attention_mask"] and result.manifest.parity.passed
    emb = Embedder(result.path, device="cpu")
    expected = CrossEncoder(str(folder), device="cpu").predict([(QUERY, d) for d in DOCS])
    assert np.abs(emb.score(QUERY, DOCS) - expected).max() <= 1e-5
    # the default tokenizer returns them: fed, segment B is type 1 (the scores differ from the zeros above)
    with_types = Embedder(_export(str(build_tiny_model("bert", tmp_path / "t", classifier=True,
                                                       config={"initializer_range": 0.2})), tmp_path / "t.onnx").path)
    assert "token_type_ids" in with_types.manifest.inputs
    assert np.abs(with_types.score(QUERY, DOCS) - expected).max() > 1e-4


def test_activation_is_decided_as_sentence_transformers_does():
    from toolkit.export.heads import cross_encoder_activation

    assert cross_encoder_activation({"num_labels": 1}) == "sigmoid"
    assert cross_encoder_activation({"id2label": {"0": "a", "1": "b", "2": "c"}}) == "identity"
    saved = {"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}, "num_labels": 1}
    assert cross_encoder_activation(saved) == "identity"
    assert cross_encoder_activation({"sbert_ce_default_activation_function": "torch.nn.modules.activation.Tanh"}) == "tanh"
    with pytest.raises(Exception, match="not one of"):
        cross_encoder_activation({"sentence_transformers": {"activation_fn": "torch.nn.GELU"}})


@pytest.fixture(scope="module", params=["bert", "xlm-roberta", "modernbert"])
def served_ce(request, cross_encoder_artifact, tmp_path_factory):
    if request.param == "bert":
        artifact = cross_encoder_artifact
    else:
        folder = build_tiny_model(request.param, tmp_path_factory.mktemp(f"ce-{request.param}") / "m",
                                  classifier=True, config={"initializer_range": 0.2})
        artifact = _export(str(folder), folder.parent / "ce.onnx").path
    metrics = Metrics()
    registry = load_models([artifact], ["ce"], RuntimeOptions(device="cpu"), metrics)
    with TestClient(create_app(registry, ServerOptions(), metrics)) as c:
        yield c, artifact


def test_rerank_and_score_routes_on_a_cross_encoder(served_ce):
    client, artifact = served_ce
    emb = Embedder(artifact, device="cpu")
    scores = emb.score(QUERY, DOCS)
    order = np.argsort(-scores).tolist()
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2})
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == order[:2]
    np.testing.assert_allclose([x["relevance_score"] for x in r.json()["results"]], scores[order[:2]], atol=1e-6)
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS]})
    assert [x["index"] for x in r.json()["results"]] == order and "document" not in r.json()["results"][0]
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True})  # TEI: logits
    np.testing.assert_allclose([x["score"] for x in r.json()], emb.score(QUERY, DOCS, use_activation=False)[order],
                               atol=1e-6)
    r = client.post("/score", json={"queries": QUERY, "documents": DOCS})
    np.testing.assert_allclose([d["score"] for d in r.json()["data"]], scores, atol=1e-6)
    r = client.post("/v1/score", json={"queries": [QUERY, QUERY], "documents": DOCS[:2], "use_activation": False})
    np.testing.assert_allclose([d["score"] for d in r.json()["data"]],
                               emb.score([QUERY, QUERY], DOCS[:2], use_activation=False), atol=1e-6)
    r = client.post("/pooling", json={"input": DOCS, "task": "classify"})
    np.testing.assert_allclose([d["data"] for d in r.json()["data"]], emb.classify(DOCS), atol=1e-6)
    r = client.post("/pooling", json={"input": "x", "task": "embed"})
    assert r.status_code == 400 and "this model answers: classify;" in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and "cross-encoder" in r.json()["error"]["message"]
    assert client.get("/v1/models").json()["data"][0]["task"] == "rerank"


def test_cohere_client_reranks_with_a_cross_encoder(cross_encoder_artifact):
    import cohere
    from test_serve_process import _serve

    emb = Embedder(cross_encoder_artifact, device="cpu")
    url, _, proc = _serve(cross_encoder_artifact)
    try:
        co = cohere.ClientV2(api_key="unused", base_url=url)
        response = co.rerank(model="model", query=QUERY, documents=DOCS, top_n=3)
        scores = emb.score(QUERY, DOCS, truncate_prompt_tokens=-1)
        assert [r.index for r in response.results] == np.argsort(-scores)[:3].tolist()
        np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(scores)[::-1][:3], atol=1e-6)
        assert httpx.get(url + "/ready").status_code == 200
    finally:
        proc.kill()


def test_a_saved_crossencoder_folder_keeps_its_activation(cross_encoder_dir, tmp_path):
    """sentence-transformers 6 saves a CrossEncoder with modules.json and its activation_fn in
    config_sentence_transformers.json: the export reads it there, and matches predict() with it."""
    import torch
    from sentence_transformers import CrossEncoder

    CrossEncoder(str(cross_encoder_dir), device="cpu", activation_fn=torch.nn.Identity()).save(str(tmp_path / "saved"))
    result = _export(str(tmp_path / "saved"), tmp_path / "saved.onnx")
    assert result.manifest.card.activation == "identity" and result.manifest.card.pooling.value == "rank"
    assert result.manifest.parity.reference == "sentence-transformers CrossEncoder"
    assert max(result.manifest.parity.max_abs_diff.values()) <= 1e-5
    emb = Embedder(result.path, device="cpu")
    np.testing.assert_allclose(emb.score(QUERY, DOCS), emb.score(QUERY, DOCS, use_activation=False), atol=0)


def test_max_tokens_per_doc_cuts_the_document_not_the_pair(cross_encoder_artifact):
    """vLLM's max_tokens_per_doc: each document is cut to N tokens, then paired with the whole query (the pair's
    own limit is the window); use_activation (and its old name activation) false gives the logits."""
    emb = Embedder(cross_encoder_artifact, device="cpu")
    shared = "the capital of france is paris and it is large " * 2
    docs = [shared + "alpha beta gamma", shared + "weather sunny cats dogs"]
    query = "which city is the capital of france, and how large is that city"
    n = 10
    assert len(emb.tokenize(shared, add_special_tokens=False)) > n
    with TestClient(create_app(load_models([cross_encoder_artifact], ["ce"], RuntimeOptions(device="cpu"), Metrics()),
                               ServerOptions())) as client:
        r = client.post("/rerank", json={"query": query, "documents": docs, "max_tokens_per_doc": n})
        assert r.status_code == 200, r.text
        scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert scores[0] == pytest.approx(scores[1], abs=1e-7)  # the same first N tokens
        query_tokens = len(emb.tokenize(query, add_special_tokens=False))
        assert r.json()["usage"]["prompt_tokens"] == 2 * (query_tokens + n + 3)  # [CLS] q [SEP] d [SEP]
        full = client.post("/rerank", json={"query": query, "documents": docs}).json()["results"]
        assert abs(full[0]["relevance_score"] - full[1]["relevance_score"]) > 1e-4
        for name in ("use_activation", "activation"):
            raw = client.post("/rerank", json={"query": query, "documents": docs[:1], name: False}).json()
            assert raw["results"][0]["relevance_score"] == pytest.approx(
                float(emb.score(query, docs[:1], use_activation=False)[0]), abs=1e-5)
        r = client.post("/rerank", json={"query": query, "documents": docs, "max_tokens_per_doc": 0})
        assert r.status_code == 400 and "must be a positive integer" in r.json()["error"]["message"]
