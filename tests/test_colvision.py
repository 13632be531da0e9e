"""ColVision (ColQwen2, ColQwen2.5): tiny ``ColQwen2ForRetrieval`` checkpoints saved with their ``ColQwen2Processor``
exported at parity, their per-token vectors of texts (queries) and images (pages) and MaxSim against transformers'
model, processor and ``score_retrieval``, and the routes that take image documents (vLLM's ``{"content": [...]}``
on /score and /rerank, ``messages`` on /pooling; Cohere's client on text documents)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from conftest import _export, assert_matrices_close, serve_subprocess
from tiny_models import build_tiny_colpali, build_tiny_colqwen2

from toolkit.errors import RequestError
from toolkit.export.towers import probe_images
from toolkit.runtime import Embedder
from toolkit.runtime.vision_language import Multimodal

QUERIES = ["which page shows the revenue chart?", "a photo of a cat on a sofa", "tables, figures & captions"]
PAGES = ["wide.png", "tall.png", "photo.jpg", "gray.png", "palette.png"]


@pytest.fixture(scope="module")
def colqwen(tmp_path_factory):
    """(the checkpoint folder, its export result)."""
    folder = build_tiny_colqwen2(tmp_path_factory.mktemp("colqwen2") / "tiny-colqwen2")
    return folder, _export(str(folder), folder.parent / "tiny-colqwen2.onnx")


@pytest.fixture(scope="module")
def emb(colqwen) -> Embedder:
    return Embedder(colqwen[1].path, device="cpu")


@pytest.fixture(scope="module")
def reference(colqwen):
    """transformers' model and processor, as a ColQwen2 user runs them."""
    from transformers import ColQwen2ForRetrieval, ColQwen2Processor

    folder = colqwen[0]
    return ColQwen2ForRetrieval.from_pretrained(folder).eval(), ColQwen2Processor.from_pretrained(folder)


def _reference_rows(reference, *, queries=None, images=None) -> list[np.ndarray]:
    model, processor = reference
    batch = processor.process_queries(queries) if queries is not None else processor.process_images(images)
    with torch.no_grad():
        out = model(**batch).embeddings.numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    return [out[i][mask[i]] for i in range(len(out))]


def _pages() -> list[bytes]:
    images = probe_images()
    return [images[name] for name in PAGES]


def test_the_export_declares_colvision_and_passes_parity(colqwen):
    manifest = colqwen[1].manifest
    assert manifest.head.name == "colvision" and manifest.head.tasks == ["token_embed", "score"]
    assert manifest.head.late_interaction is not None and manifest.outputs == ["colbert_embeddings"]
    assert manifest.embedding_dim == 128 and manifest.card.pooling is None
    spec = manifest.vision_language
    assert spec.sequential_positions and spec.templates["text"].startswith("Query: {text}<|endoftext|>")
    assert spec.templates["text"].endswith("<|endoftext|>" * 10 + "\n")
    assert spec.templates["image"] == ("<|im_start|>user\n<|vision_start|>{image}<|vision_end|>Describe the image."
                                       "<|im_end|><|endoftext|>")
    parity = manifest.parity
    assert parity.passed and parity.reference.startswith("transformers ColQwen2ForRetrieval")
    shown = subprocess.run([sys.executable, "-m", "toolkit.cli", "inspect", str(colqwen[1].path)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0 and "per token; normalize=True" in shown.stdout, shown.stdout + shown.stderr
    assert max(parity.max_abs_diff.values()) <= 1e-5, parity.max_abs_diff


def test_vectors_of_queries_and_pages_equal_transformers(emb, reference):
    """Queries as process_queries writes them, pages as process_images (RGBA on white, grayscale, palette), batched
    with padding and alone; the mode changes nothing (the processor has one form per kind)."""
    from PIL import Image

    assert_matrices_close(emb.embed_multi(QUERIES, is_query=True), _reference_rows(reference, queries=QUERIES))
    assert_matrices_close(emb.embed_multi(QUERIES, is_query=False), _reference_rows(reference, queries=QUERIES))
    pages = _pages()
    expected = _reference_rows(reference, images=[Image.open(io.BytesIO(b)) for b in pages])
    assert_matrices_close(emb.embed_multi(pages), expected)
    assert_matrices_close([emb.embed_multi([p])[0] for p in pages[:2]], expected[:2])
    # PIL images and data URIs are the same pages
    assert_matrices_close(emb.embed_multi([Image.open(io.BytesIO(pages[0]))]), expected[:1])


def test_max_sim_score_and_rerank_of_image_pages_equal_score_retrieval(emb, reference):
    from PIL import Image

    pages = _pages()
    ref_q = _reference_rows(reference, queries=QUERIES)
    ref_d = _reference_rows(reference, images=[Image.open(io.BytesIO(b)) for b in pages])
    expected = reference[1].score_retrieval([torch.from_numpy(m) for m in ref_q],
                                            [torch.from_numpy(m) for m in ref_d]).numpy()
    got = emb.max_sim(emb.embed_multi(QUERIES, is_query=True), emb.embed_multi(pages))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(emb.score(QUERIES[0], pages), expected[0], atol=1e-4)
    ranked = emb.rerank(QUERIES[1], pages, top_n=2)
    assert [r["index"] for r in ranked] == np.argsort(-expected[1], kind="stable")[:2].tolist()


def test_what_the_processor_cannot_read_is_refused(emb):
    with pytest.raises(RequestError, match="text-only|image-only|text \\+ image"):
        emb.embed_multi([Multimodal("a caption", [_pages()[0]])])
    with pytest.raises(RequestError, match="processor"):
        emb.embed_multi(QUERIES[:1], prompt="Query: ")
    with pytest.raises(RequestError, match="token_embed"):
        emb.embed(QUERIES[:1])


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_routes_take_image_pages_in_vllms_forms(colqwen, emb):
    """vLLM's /score (data_2 of {"content": [...]}, and one {"content": [...]} of parts), /rerank with content
    documents, /pooling token_embed of messages with an image, the official cohere client's rerank on texts:
    each as the Python API answers; a page with a caption is a 400 in vLLM's shape."""
    import cohere
    from PIL import Image

    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in _pages()[:3]]
    encoded = []
    for page in pages:
        buf = io.BytesIO()
        page.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    contents = [{"content": [{"type": "image_url", "image_url": {"url": _data_uri(b)}}]} for b in encoded]
    scores = emb.score(QUERIES[0], encoded)
    url, _, proc = serve_subprocess(colqwen[1].path, ready="/health")
    try:
        body = httpx.post(url + "/score", json={"data_1": QUERIES[0], "data_2": contents}, timeout=60)
        assert body.status_code == 200, body.text
        np.testing.assert_allclose([d["score"] for d in body.json()["data"]], scores, atol=1e-5)
        parts = {"content": [c["content"][0] for c in contents]}
        body = httpx.post(url + "/v1/score", json={"queries": QUERIES[0], "documents": parts}, timeout=60).json()
        np.testing.assert_allclose([d["score"] for d in body["data"]], scores, atol=1e-5)
        body = httpx.post(url + "/rerank", json={"query": QUERIES[0], "documents": contents, "top_n": 2}, timeout=60)
        assert body.status_code == 200, body.text
        results = body.json()["results"]
        assert [r["index"] for r in results] == np.argsort(-scores, kind="stable")[:2].tolist()
        assert results[0]["document"]["multi_modal"] == contents[results[0]["index"]]["content"]
        body = httpx.post(url + "/pooling", json={"task": "token_embed", "messages": [
            {"role": "user", "content": contents[1]["content"]}]}, timeout=60)
        assert body.status_code == 200, body.text
        assert_matrices_close([np.asarray(body.json()["data"][0]["data"], dtype=np.float32)], emb.embed_multi([encoded[1]]))
        body = httpx.post(url + "/pooling", json={"task": "token_embed", "input": QUERIES[:2], "is_query": True})
        assert_matrices_close([np.asarray(d["data"], dtype=np.float32) for d in body.json()["data"]],
               emb.embed_multi(QUERIES[:2], is_query=True))
        co = cohere.ClientV2(api_key="unused", base_url=url)
        texts = ["a revenue chart", "a cat", "the table of contents"]
        response = co.rerank(model="tiny-colqwen2", query=QUERIES[0], documents=texts, top_n=3)
        expected = emb.score(QUERIES[0], texts)
        assert [r.index for r in response.results] == np.argsort(-expected, kind="stable").tolist()
        captioned = {"content": [*contents[0]["content"], {"type": "text", "text": "Describe the image."}]}
        body = httpx.post(url + "/score", json={"data_1": QUERIES[0], "data_2": [captioned]})
        assert body.status_code == 400 and "mixes text and an image" in body.json()["error"]["message"], body.text
        broken = [{"content": [{"type": "image_url", "image_url": {"url": _data_uri(b"not a png at all")}}]}]
        for path, request in (("/score", {"data_1": QUERIES[0], "data_2": broken}),
                              ("/rerank", {"query": QUERIES[0], "documents": broken}),
                              ("/pooling", {"task": "token_embed", "messages": [
                                  {"role": "user", "content": broken[0]["content"]}]})):
            body = httpx.post(url + path, json=request, timeout=60)
            assert body.status_code == 400 and "not an image" in body.json()["error"]["message"], (path, body.text)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.kill()


def test_colqwen2_5_exports_at_parity(tmp_path):
    folder = build_tiny_colqwen2(tmp_path / "tiny-colqwen2.5", family="qwen2_5_vl")
    result = _export(str(folder), tmp_path / "colqwen2.5.onnx")
    assert result.manifest.vision_language.family == "qwen2_5_vl" and result.manifest.parity.passed
    assert max(result.manifest.parity.max_abs_diff.values()) <= 1e-5


def test_colpali_exports_at_parity_and_scores_pages_as_transformers(tmp_path):
    """ColPali (PaliGemma: a SigLIP tower, Gemma read bidirectionally over its all-prefix prompts, positions from 1):
    its processor's prompts (bos + "Question: " + text + 10 pads + newline; image tokens, bos, "Describe the
    image." and a newline), vectors and MaxSim as ColPaliForRetrieval with ColPaliProcessor give them."""
    from PIL import Image
    from transformers import ColPaliForRetrieval, ColPaliProcessor

    folder = build_tiny_colpali(tmp_path / "tiny-colpali")
    result = _export(str(folder), tmp_path / "colpali.onnx")
    manifest = result.manifest
    assert manifest.head.name == "colvision" and manifest.vision_language.family == "paligemma"
    assert manifest.vision_language.templates == {"text": "<bos>Question: {text}" + "<pad>" * 10 + "\n",
                                                  "image": "{image}<bos>Describe the image.\n"}
    assert manifest.parity.passed and manifest.parity.reference == "transformers ColPaliForRetrieval + ColPaliProcessor"
    assert max(manifest.parity.max_abs_diff.values()) <= 1e-5, manifest.parity.max_abs_diff
    reference = (ColPaliForRetrieval.from_pretrained(folder).eval(), ColPaliProcessor.from_pretrained(folder))
    emb = Embedder(result.path, device="cpu")
    pages = _pages()
    ref_q = _reference_rows(reference, queries=QUERIES)
    ref_d = _reference_rows(reference, images=[Image.open(io.BytesIO(b)) for b in pages])
    assert_matrices_close(emb.embed_multi(QUERIES, is_query=True), ref_q)
    assert_matrices_close(emb.embed_multi(pages), ref_d)
    expected = reference[1].score_retrieval([torch.from_numpy(m) for m in ref_q],
                                            [torch.from_numpy(m) for m in ref_d]).numpy()
    np.testing.assert_allclose(emb.score(QUERIES[2], pages), expected[2], atol=1e-4)


def test_the_bundled_cards_name_late_interaction_and_check_the_checkpoint(colqwen, tmp_path):
    """A checkpoint saved under a bundled card's name gets that card (per-token: no pooling); a card that says late
    interaction on a folder that is no ColBERT or ColVision checkpoint is refused, naming both."""
    from tiny_models import build_tiny_model

    from toolkit.errors import ConfigError
    from toolkit.export.resolve import resolve_model
    from toolkit.settings import ExportOptions

    link = tmp_path / "colqwen2-v1.0-hf"
    link.symlink_to(colqwen[0], target_is_directory=True)
    resolved = resolve_model(str(link), ExportOptions())
    assert resolved.card.name == "colqwen2-v1.0-hf" and resolved.card.late_interaction
    assert resolved.card.source == "vidore/colqwen2-v1.0-hf" and resolved.card.pooling is None
    assert resolved.head.name == "colvision"
    plain = build_tiny_model("bert", tmp_path / "colbertv2.0")
    with pytest.raises(ConfigError, match="late-interaction model, but the folder is not a ColBERT"):
        resolve_model(str(plain), ExportOptions(pooling="mean"))


def test_an_image_processor_setting_the_runtime_cannot_reproduce_is_refused(colqwen, tmp_path):
    """processor_config.json's image processor (transformers 5 saves it there) is read like preprocessor_config.json:
    a setting the runtime does not reproduce is a ConfigError naming the folder."""
    import json
    import shutil

    from toolkit.errors import ConfigError
    from toolkit.export.resolve import resolve_model
    from toolkit.export.vision_language import vision_language_spec
    from toolkit.runtime.tokenization import Tokenizer
    from toolkit.settings import ExportOptions

    folder = shutil.copytree(colqwen[0], tmp_path / "odd-colqwen2")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["do_normalize"] = False
    (folder / "processor_config.json").write_text(json.dumps(config))
    resolved = resolve_model(str(folder), ExportOptions())
    with pytest.raises(ConfigError, match="odd-colqwen2: only the processor's default resize, rescale and normalize"):
        vision_language_spec(resolved, Tokenizer(resolved.files.tokenizer_json, max_length=512))
