"""Text classifiers (sequence classification with N labels): export with the config's id2label and the activation
transformers' text-classification pipeline applies, parity against the pipeline and the raw logits, and every
route that serves them: TEI's ``/predict`` (and ``POST /``, ``/info``), vLLM's ``/classify`` (and ``/pooling``,
``/invocations``), ``huggingface_hub.InferenceClient.text_classification`` against a live server, and
``toolkit embed``."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import _export, async_app_client, serve_subprocess
from tiny_models import build_tiny_model

from toolkit.corpus import load_corpus
from toolkit.runtime import Embedder

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["the film was wonderful", "a dull, grey afternoon", "prices rose by two percent"]
PAIR = ("a man is eating food", "a man is eating a meal")


def _pipeline_scores(folder, inputs, labels, max_length, **kwargs) -> np.ndarray:
    """transformers' text-classification pipeline, every label, in label order: the reference a user has."""
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(folder), device="cpu", top_k=None)
    out = np.zeros((len(inputs), len(labels)))
    for row, entries in enumerate(classifier(inputs, truncation=True, max_length=max_length, **kwargs)):
        for entry in entries:
            out[row, labels.index(entry["label"])] = entry["score"]
    return out


@pytest.fixture(scope="module")
def classifier(classifier_artifact):
    return Embedder(classifier_artifact, device="cpu")


@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert", "qwen3"])
def test_classifier_export_matches_the_pipeline(model_type, tmp_path):
    folder = build_tiny_model(model_type, tmp_path / "m", classifier=LABELS, config={"initializer_range": 0.2})
    result = _export(str(folder), tmp_path / "cls.onnx")
    manifest = result.manifest
    assert manifest.head.name == "labels" and manifest.head.tasks == ["classify"] and not manifest.head.pairs
    assert manifest.card.labels == LABELS and manifest.card.activation == "softmax"
    assert manifest.outputs == ["logits"] and manifest.embedding_dim == 3
    parity = manifest.parity
    assert parity.passed and parity.reference == "transformers text-classification pipeline"
    assert set(parity.max_abs_diff) == {"logits", "probabilities (text-classification pipeline)"}
    assert max(parity.max_abs_diff.values()) <= 1e-5, parity.max_abs_diff
    emb = Embedder(result.path, device="cpu")
    long_text = " ".join(load_corpus(limit=200)[:120])  # past the window: cut where the pipeline cuts
    texts = [*TEXTS, long_text]
    limit = emb.manifest.max_seq_len
    expected = _pipeline_scores(folder, texts, LABELS, limit)
    got = emb.classify(texts, truncate_prompt_tokens=limit)
    assert np.abs(got - expected).max() <= 1e-5
    alone = np.concatenate([emb.classify([t], truncate_prompt_tokens=limit) for t in texts])  # batch 1 each
    assert np.abs(alone - expected).max() <= 1e-5
    # a pair, as the pipeline takes {"text", "text_pair"}
    pair_expected = _pipeline_scores(folder, [{"text": PAIR[0], "text_pair": PAIR[1]}], LABELS, limit)
    assert np.abs(emb.classify([PAIR]) - pair_expected).max() <= 1e-5
    # raw logits: the pipeline with function_to_apply="none"
    raw = _pipeline_scores(folder, TEXTS, LABELS, limit, function_to_apply="none")
    assert np.abs(emb.classify(TEXTS, use_activation=False) - raw).max() <= 1e-5
    ranked = emb.predict(TEXTS)
    for row, scores in zip(ranked, expected):
        assert [r["label"] for r in row] == [LABELS[j] for j in np.argsort(-scores, kind="stable")]
        assert [r["score"] for r in row] == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    with pytest.raises(Exception, match="text classifier artifact does not answer 'score'; it answers: classify"):
        emb.score("a", ["b"])
    with pytest.raises(Exception, match="does not answer 'embed'"):
        emb.embed("x")


@pytest.mark.parametrize(("problem_type", "activation"), [("multi_label_classification", "sigmoid"),
                                                          ("regression", "identity")])
def test_the_activation_follows_the_pipeline(problem_type, activation, tmp_path):
    folder = build_tiny_model("bert", tmp_path / "m", classifier=["a", "b"],
                              config={"initializer_range": 0.2, "problem_type": problem_type})
    result = _export(str(folder), tmp_path / "cls.onnx")
    assert result.manifest.card.activation == activation and result.manifest.parity.passed
    emb = Embedder(result.path, device="cpu")
    expected = _pipeline_scores(folder, TEXTS, ["a", "b"], emb.manifest.max_seq_len)
    assert np.abs(emb.classify(TEXTS) - expected).max() <= 1e-5


def test_a_one_label_cross_encoder_keeps_scoring(cross_encoder_artifact):
    emb = Embedder(cross_encoder_artifact, device="cpu")
    assert emb.head.name == "classifier" and emb.tasks == ("score", "classify") and emb.labels == ["LABEL_0"]
    assert emb.score("q", ["d"]).shape == (1,)


@pytest.mark.anyio
async def test_tei_predict(classifier_artifact, classifier):
    async with async_app_client(classifier_artifact, ["cls"]) as client:
        r = await client.post("/predict", json={"inputs": TEXTS[0]})
        assert r.status_code == 200, r.text
        assert r.json() == [{"score": pytest.approx(p["score"], abs=1e-6), "label": p["label"]}
                            for p in classifier.predict(TEXTS[0])[0]]
        assert [p["label"] for p in r.json()] == [p["label"] for p in classifier.predict(TEXTS[0])[0]]
        # TEI's reading of inputs: two strings are one pair; a list of lists is a batch of texts and pairs
        r = await client.post("/predict", json={"inputs": list(PAIR)})
        assert isinstance(r.json()[0], dict)
        assert r.json()[0]["score"] == pytest.approx(classifier.predict([PAIR])[0][0]["score"], abs=1e-6)
        r = await client.post("/predict", json={"inputs": [[TEXTS[0]], list(PAIR), [TEXTS[1]]]})
        batch = r.json()
        assert len(batch) == 3 and all(len(row) == 3 for row in batch)
        expected = classifier.predict([TEXTS[0], PAIR, TEXTS[1]])
        for got, want in zip(batch, expected):
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
        r = await client.post("/predict", json={"inputs": TEXTS[0], "raw_scores": True})
        logits = classifier.classify([TEXTS[0]], use_activation=False)[0]
        assert sorted(p["score"] for p in r.json()) == pytest.approx(sorted(logits.tolist()), abs=1e-5)
        # too long: TEI's 413 unless truncate is on
        long_text = " ".join(load_corpus(limit=200)[:120])
        r = await client.post("/predict", json={"inputs": long_text})
        assert r.status_code == 413 and r.json()["error_type"] == "Validation", r.text
        r = await client.post("/predict", json={"inputs": long_text, "truncate": True})
        assert r.status_code == 200 and len(r.json()) == 3
        # what TEI refuses, in TEI's shape
        for bad in ([], ["a", "b", "c"], [["a", "b", "c"]], [[]], [1, 2], {"x": 1}):
            r = await client.post("/predict", json={"inputs": bad})
            assert r.status_code == 422 and set(r.json()) == {"error", "error_type"}, (bad, r.text)
            assert r.json()["error_type"] == "Validation"
        # POST / on a classifier is /predict; the Inference API's body (parameters) gets its nested answer
        r = await client.post("/", json={"inputs": TEXTS[0]})
        assert r.status_code == 200 and [p["label"] for p in r.json()] == [p["label"] for p in
                                                                          classifier.predict(TEXTS[0])[0]]
        r = await client.post("/", json={"inputs": TEXTS[0], "parameters": {"top_k": 2}})
        assert len(r.json()) == 1 and len(r.json()[0]) == 2
        r = await client.post("/", json={"inputs": TEXTS[0], "parameters": {"function_to_apply": "sigmoid"}})
        expected = 1 / (1 + np.exp(-classifier.classify([TEXTS[0]], use_activation=False)[0]))
        assert sorted(p["score"] for p in r.json()[0]) == pytest.approx(sorted(expected.tolist()), abs=1e-5)
        r = await client.post("/", json={"inputs": TEXTS[0], "parameters": {"function_to_apply": "relu"}})
        assert r.status_code == 422 and "sigmoid, softmax, none" in r.json()["error"]
        r = await client.post("/invocations", json={"inputs": [[TEXTS[0]]]})
        assert r.status_code == 200 and len(r.json()) == 1 and len(r.json()[0]) == 3
        # /info says what TEI says of a classifier; /rerank is refused as TEI refuses it
        info = (await client.get("/info")).json()
        assert info["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "neutral", "2": "positive"},
                                                     "label2id": {"negative": 0, "neutral": 1, "positive": 2}}}
        r = await client.post("/rerank", json={"query": "q", "texts": ["a"]})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert "not a re-ranker model" in r.json()["error"]


@pytest.mark.anyio
async def test_predict_on_other_kinds(tiny_artifact, cross_encoder_artifact):
    async with async_app_client(tiny_artifact) as client:
        r = await client.post("/predict", json={"inputs": "x"})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert "Model is not a classifier model" in r.json()["error"]
        assert (await client.get("/info")).json()["model_type"] == {"embedding": {"pooling": "cls"}}
    async with async_app_client(cross_encoder_artifact, ["ce"]) as client:  # TEI predicts with a reranker too
        r = await client.post("/predict", json={"inputs": list(PAIR)})
        ce = Embedder(cross_encoder_artifact, device="cpu")
        assert r.status_code == 200 and r.json()[0]["label"] == "LABEL_0"
        assert r.json()[0]["score"] == pytest.approx(float(ce.score(*PAIR)[0]), abs=1e-6)
        info = (await client.get("/info")).json()
        assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}


@pytest.mark.anyio
async def test_vllm_classify(classifier_artifact, classifier):
    async with async_app_client(classifier_artifact, ["cls"]) as client:
        r = await client.post("/classify", json={"model": "cls", "input": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "cls" and body["id"].startswith("classify-")
        probs = classifier.classify(TEXTS)
        for i, row in enumerate(body["data"]):
            assert row["index"] == i and row["num_classes"] == 3
            assert row["probs"] == pytest.approx(probs[i].tolist(), abs=1e-6)
            assert row["label"] == LABELS[int(np.argmax(probs[i]))]
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == classifier.count_tokens(TEXTS)
        r = await client.post("/classify", json={"input": TEXTS[0], "truncate_prompt_tokens": 3})
        assert r.json()["usage"]["prompt_tokens"] == 3
        for off in ({"use_activation": False}, {"activation": False}, {"softmax": False}):
            r = await client.post("/classify", json={"input": TEXTS[0], **off})
            assert r.json()["data"][0]["probs"] == pytest.approx(
                classifier.classify([TEXTS[0]], use_activation=False)[0].tolist(), abs=1e-5)
        r = await client.post("/classify", json={"input": []})
        assert r.status_code == 200 and r.json()["data"] == []
        r = await client.post("/classify", json={"input": ""})
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
        r = await client.post("/classify", json={"input": "x", "truncate_prompt_tokens": 100000})
        assert r.status_code == 400 and "truncate_prompt_tokens" in r.json()["error"]["message"]
        # /pooling's classify and /invocations answer the same probabilities
        r = await client.post("/pooling", json={"input": TEXTS, "task": "classify"})
        np.testing.assert_allclose([d["data"] for d in r.json()["data"]], probs, atol=1e-6)
        r = await client.post("/invocations", json={"input": TEXTS})
        assert r.status_code == 200 and r.json()["object"] == "list"
        np.testing.assert_allclose([d["probs"] for d in r.json()["data"]], probs, atol=1e-6)
        r = await client.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and "answers: classify" in r.json()["error"]["message"]


def test_inference_client_text_classification(classifier_artifact, classifier, inference_client):
    url, _, proc = serve_subprocess(classifier_artifact)
    try:
        client = inference_client(url)
        out = client.text_classification(TEXTS[0])
        expected = classifier.predict(TEXTS[0])[0]
        assert [o.label for o in out] == [e["label"] for e in expected]
        assert [o.score for o in out] == pytest.approx([e["score"] for e in expected], abs=1e-6)
        top = client.text_classification(TEXTS[0], top_k=1)
        assert len(top) == 1 and top[0].label == expected[0]["label"]
        r = httpx.post(url + "/predict", json={"inputs": [[t] for t in TEXTS]})
        assert r.status_code == 200 and len(r.json()) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_toolkit_embed_writes_labels_and_probabilities(classifier_artifact, classifier, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["embed", str(classifier_artifact), str(source), "--output", str(out)])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(out.glob("*.parquet"))[0])
    assert table.column_names == ["row", "label", "probabilities"]
    rows = table.to_pylist()
    probs = classifier.classify(TEXTS)
    assert len(rows) == len(TEXTS)
    for row, p in zip(rows, probs):
        assert row["label"] == LABELS[int(np.argmax(p))]
        assert row["probabilities"] == pytest.approx(p.tolist(), abs=1e-6)
