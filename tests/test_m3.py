"""BGE-M3's three outputs from one artifact (dense CLS, sparse lexical weights, ColBERT vectors), against a
reference computed in torch the way FlagEmbedding's BGEM3FlagModel computes them, on a tiny XLM-RoBERTa saved
in FlagEmbedding's layout (sparse_linear.pt and colbert_linear.pt beside the checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import serve_subprocess  # noqa: E402
from tiny_models import add_sentence_transformers_layout, build_tiny_model  # noqa: E402

from toolkit.export import export_model  # noqa: E402
from toolkit.runtime import Embedder  # noqa: E402
from toolkit.settings import ExportOptions  # noqa: E402

TEXTS = ["the cat sat on the mat, the cat", "x", "a longer passage about sparse lexical weights and late interaction"]


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory) -> Path:
    folder = build_tiny_model("xlm-roberta", tmp_path_factory.mktemp("m3") / "tiny-m3")
    add_sentence_transformers_layout(folder, pooling="cls")
    torch.manual_seed(3)
    sparse, colbert = torch.nn.Linear(32, 1), torch.nn.Linear(32, 32)
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    torch.save(colbert.state_dict(), folder / "colbert_linear.pt")
    return folder


@pytest.fixture(scope="module")
def m3_artifact(m3_dir) -> Path:
    return export_model(str(m3_dir), ExportOptions(output=m3_dir.parent / "m3.onnx")).path


def flag_embedding_reference(folder: Path, texts: list[str]):
    """(dense, lexical weights {id: weight}, colbert vectors) per text, as BGEM3FlagModel.encode computes them."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    sparse_linear, colbert_linear = torch.nn.Linear(32, 1), torch.nn.Linear(32, 32)
    sparse_linear.load_state_dict(torch.load(folder / "sparse_linear.pt"))
    colbert_linear.load_state_dict(torch.load(folder / "colbert_linear.pt"))
    unused = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1)[0].numpy()
            weights = torch.relu(sparse_linear(hidden))[0, :, 0]
            lexical: dict[int, float] = {}
            for token, weight in zip(enc["input_ids"][0].tolist(), weights.tolist()):
                if token in unused or weight <= 0:
                    continue
                lexical[token] = max(lexical.get(token, 0.0), weight)
            colbert = colbert_linear(hidden[:, 1:]) * enc["attention_mask"][:, 1:][:, :, None]
            colbert = torch.nn.functional.normalize(colbert, dim=-1)[0]
            out.append((dense, lexical, colbert[: int(enc["attention_mask"].sum()) - 1].numpy()))
    return out


def test_one_artifact_gives_dense_sparse_and_colbert_like_flag_embedding(m3_dir, m3_artifact):
    emb = Embedder(m3_artifact, device="cpu")
    manifest = emb.manifest
    assert manifest.outputs[-2:] == ["sparse_embedding", "colbert_embeddings"]
    assert manifest.parity.passed and min(manifest.parity.min_cosine.values()) >= 0.99999, manifest.parity.min_cosine
    assert emb.tasks == ("embed", "token_embed", "score", "embed_sparse")
    reference = flag_embedding_reference(m3_dir, TEXTS)
    dense = emb.embed(TEXTS)  # one padded batch for each output
    sparse = emb.embed_sparse(TEXTS)
    colbert = emb.encode(TEXTS, pooling_task="token_embed")
    for i, (ref_dense, ref_lexical, ref_colbert) in enumerate(reference):
        np.testing.assert_allclose(dense[i], ref_dense, atol=1e-5)
        indices, values = sparse[i]
        assert indices.tolist() == sorted(ref_lexical), f"text {i}: other vocabulary ids"
        np.testing.assert_allclose(values, [ref_lexical[k] for k in sorted(ref_lexical)], rtol=1e-4, atol=1e-6)
        assert colbert[i].shape == ref_colbert.shape
        np.testing.assert_allclose(colbert[i], ref_colbert, atol=1e-5)
    # repeated tokens keep their max weight, and specials are dropped
    assert len(set(emb.tokenize("the cat sat on the mat, the cat"))) > len(sparse[0][0]) >= 1


def test_m3_over_http_dense_sparse_and_tokens(m3_artifact):
    url, _, proc = serve_subprocess(m3_artifact)
    try:
        emb = Embedder(m3_artifact, device="cpu")
        with httpx.Client(base_url=url, timeout=30) as client:
            dense = client.post("/v1/embeddings", json={"input": TEXTS}).json()["data"]
            np.testing.assert_allclose([d["embedding"] for d in dense], emb.embed(TEXTS), atol=1e-5)
            sparse = client.post("/embed_sparse", json={"inputs": TEXTS[:1]}).json()[0]
            indices, values = emb.embed_sparse(TEXTS[:1])[0]
            assert [e["index"] for e in sparse] == indices.tolist()
            tokens = client.post("/pooling", json={"input": TEXTS[:1], "task": "token_embed"}).json()["data"][0]["data"]
            np.testing.assert_allclose(tokens, emb.encode(TEXTS[:1], pooling_task="token_embed")[0], atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
