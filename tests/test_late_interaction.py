"""Late interaction (ColBERT): a tiny checkpoint saved by sentence-transformers 6's ``MultiVectorEncoder`` exported
at parity, its query / document vectors and MaxSim against ``encode_query`` / ``encode_document`` / ``similarity``,
and the routes that score by MaxSim (the official cohere client's rerank, vLLM's /score, /pooling token_embed)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from conftest import _export, assert_matrices_close, serve_subprocess
from tiny_models import build_tiny_colbert, build_tiny_stanford_colbert

from toolkit.corpus import load_corpus
from toolkit.runtime import Embedder
from toolkit.runtime.late_interaction import max_sim

QUERIES = ["how do I run an onnx graph?", "what is the capital of france, and why is it paris?",
           " ".join(load_corpus(limit=40)[:3])]  # the last one is cut to the query length
DOCUMENTS = ["ONNX Runtime executes graphs, fast!", "the weather is sunny today.", "export a model to ONNX (v2)",
             "cats sleep", " ".join(load_corpus(limit=60)[10:30])]  # the last one is cut to the document length


@pytest.fixture(scope="module")
def colbert(tmp_path_factory):
    """(the checkpoint folder, its export result, the reference MultiVectorEncoder)."""
    from sentence_transformers import MultiVectorEncoder

    folder = build_tiny_colbert(tmp_path_factory.mktemp("colbert") / "tiny-colbert")
    result = _export(str(folder), folder.parent / "tiny-colbert.onnx")
    return folder, result, MultiVectorEncoder(str(folder), device="cpu")


@pytest.fixture(scope="module")
def emb(colbert) -> Embedder:
    return Embedder(colbert[1].path, device="cpu")


def test_the_export_declares_late_interaction_and_passes_parity(colbert):
    manifest = colbert[1].manifest
    head, late = manifest.head, manifest.head.late_interaction
    assert head.name == "multi_vector" and head.tasks == ["token_embed", "score"] and late is not None
    assert manifest.outputs == ["colbert_embeddings"] and manifest.embedding_dim == 128
    assert late.prompts == {"query": "[unused0] ", "document": "[unused1] "}
    assert (late.expansion, late.expansion_length, late.attend_expansion) == ("fixed", 16, False)
    assert late.document_length == 48 and late.skiplist_modes == ["document"] and late.similarity == "maxsim"
    tok = Embedder(colbert[1].path, device="cpu").tokenizer
    assert late.expansion_id == tok.token_id("[MASK]") and tok.token_id(".") in late.skiplist_ids
    parity = manifest.parity
    assert parity.passed and parity.reference == "sentence-transformers MultiVectorEncoder"
    assert parity.max_abs_diff and max(parity.max_abs_diff.values()) <= 1e-5, parity.max_abs_diff


def test_embed_multi_equals_encode_query_and_encode_document(colbert, emb):
    reference = colbert[2]
    queries = emb.embed_multi(QUERIES, is_query=True)
    assert_matrices_close(queries, reference.encode_query(QUERIES, convert_to_numpy=True))
    assert all(len(q) == 16 for q in queries)  # expanded with [MASK] (or cut) to the query length
    documents = emb.embed_multi(DOCUMENTS)  # document mode by default, as MultiVectorEncoder.encode
    assert_matrices_close(documents, reference.encode_document(DOCUMENTS, convert_to_numpy=True))
    assert len(documents[-1]) < 48  # cut to the document length, then the punctuation dropped
    alone = [emb.embed_multi(d, is_query=False)[0] for d in DOCUMENTS]  # padding invariance
    assert_matrices_close(alone, documents, atol=1e-6)
    assert len(emb.embed_multi("cats sleep.", prompt_name="document")[0]) == len(documents[3])  # "." dropped
    assert_matrices_close(emb.embed_multi(QUERIES[:1], prompt_name="query"), queries[:1], atol=1e-6)
    with pytest.raises(Exception, match="contradicts"):
        emb.embed_multi("x", is_query=True, prompt_name="document")


def test_max_sim_score_and_rerank_equal_the_reference(colbert, emb):
    reference = colbert[2]
    ref_q = reference.encode_query(QUERIES, convert_to_numpy=True)
    ref_d = reference.encode_document(DOCUMENTS, convert_to_numpy=True)
    expected = reference.similarity(ref_q, ref_d).numpy()
    got = emb.max_sim(emb.embed_multi(QUERIES, is_query=True), emb.embed_multi(DOCUMENTS))
    assert got.shape == (len(QUERIES), len(DOCUMENTS))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(emb.score(QUERIES[0], DOCUMENTS), expected[0], atol=1e-5)
    np.testing.assert_allclose(emb.score(QUERIES, DOCUMENTS[:3]), np.diag(expected[:, :3]), atol=1e-5)  # N-N pairs
    ranked = emb.rerank(QUERIES[1], DOCUMENTS, top_n=3, return_documents=True)
    assert [r["index"] for r in ranked] == np.argsort(-expected[1], kind="stable")[:3].tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in ranked], np.sort(expected[1])[::-1][:3], atol=1e-5)
    with pytest.raises(Exception, match="embed"):
        emb.embed("x")  # no pooled vector: the artifact answers token_embed and score


def test_max_sim_is_the_sum_of_best_dot_products():
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 5)]
    documents = [rng.normal(size=(n, 8)).astype(np.float32) for n in (1, 4, 7)]
    loops = np.array([[(q @ d.T).max(1).sum() for d in documents] for q in queries])
    np.testing.assert_allclose(max_sim(queries, documents), loops, rtol=1e-5)
    np.testing.assert_allclose(max_sim(queries, documents, mean=True), loops / [[3], [5]], rtol=1e-5)
    np.testing.assert_allclose(max_sim(queries, documents[:2], pairwise=True), [loops[0, 0], loops[1, 1]], rtol=1e-5)


def test_a_stanford_colbert_checkpoint_exports_at_parity(tmp_path):
    """Stanford-NLP ColBERT's layout (colbertv2.0's: HF_ColBERT, linear.weight beside the encoder's weights,
    artifact.metadata): read as MultiVectorEncoder reads it, the export equal to the library's vectors and MaxSim."""
    folder = build_tiny_stanford_colbert(tmp_path / "stanford")
    result = _export(str(folder), tmp_path / "stanford.onnx", optimize=False)
    late = result.manifest.head.late_interaction
    assert late.prompts == {"query": "[unused0] ", "document": "[unused1] "}
    assert (late.expansion_length, late.document_length, late.attend_expansion) == (16, 48, False)
    assert result.manifest.parity.reference == "sentence-transformers MultiVectorEncoder"
    assert late.skiplist_ids and result.manifest.parity.passed
    assert max(result.manifest.parity.max_abs_diff.values()) <= 1e-5
    emb = Embedder(result.path, device="cpu")
    assert [m.shape[1] for m in emb.embed_multi(DOCUMENTS[:2])] == [128, 128]
    assert emb.tokenizer.ids("[unused1] hi", add_special_tokens=False)[0] == emb.tokenizer.token_id("[unused1]")


def test_a_pylate_v3_layout_exports_at_parity(tmp_path):
    """PyLate v3's layout (Transformer + Dense listed, the knobs flat in config_sentence_transformers.json), its
    markers plain vocabulary entries that the pre-tokenizer splits: registered as special tokens, as the library
    does, so "[unused0]" is one token in the artifact too."""
    folder = build_tiny_colbert(tmp_path / "pylate", pylate=True, seed=1)
    result = _export(str(folder), tmp_path / "pylate.onnx", optimize=False)
    late = result.manifest.head.late_interaction
    assert late.prompts == {"query": "[unused0]", "document": "[unused1]"} and late.expansion_length == 16
    assert late.skiplist_ids and result.manifest.parity.passed
    assert max(result.manifest.parity.max_abs_diff.values()) <= 1e-5
    tok = Embedder(result.path, device="cpu").tokenizer
    assert tok.ids("[unused0]hello", add_special_tokens=False)[0] == tok.token_id("[unused0]")


def test_routes_score_by_max_sim(colbert, emb):
    """The official cohere client's rerank, vLLM's /score and /v1/rerank, TEI's /rerank and /pooling token_embed
    on a real server agree with the Python API."""
    import cohere

    scores = emb.score(QUERIES[0], DOCUMENTS)
    url, _, proc = serve_subprocess(colbert[1].path, ready="/health")
    try:
        co = cohere.ClientV2(api_key="unused", base_url=url)
        response = co.rerank(model="tiny-colbert", query=QUERIES[0], documents=DOCUMENTS, top_n=3)
        assert [r.index for r in response.results] == np.argsort(-scores, kind="stable")[:3].tolist()
        np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(scores)[::-1][:3], atol=1e-5)
        body = httpx.post(url + "/score", json={"text_1": QUERIES[0], "text_2": DOCUMENTS}).json()
        np.testing.assert_allclose([d["score"] for d in body["data"]], scores, atol=1e-5)
        body = httpx.post(url + "/v1/rerank", json={"query": QUERIES[0], "documents": DOCUMENTS}).json()
        np.testing.assert_allclose(sorted(r["relevance_score"] for r in body["results"]), sorted(scores), atol=1e-5)
        tei = httpx.post(url + "/rerank", json={"query": QUERIES[0], "texts": DOCUMENTS}).json()
        assert [r["index"] for r in tei] == np.argsort(-scores, kind="stable").tolist()
        for is_query, texts in ((True, QUERIES[:2]), (False, DOCUMENTS[:2])):
            body = httpx.post(url + "/pooling", json={"input": texts, "task": "token_embed", "is_query": is_query})
            assert body.status_code == 200, body.text
            assert_matrices_close([np.asarray(d["data"], dtype=np.float32) for d in body.json()["data"]],
                   emb.embed_multi(texts, is_query=is_query))
        # the compact form: each matrix one base64 string of float16 (or float32) with its shape
        for dtype, tolerance in (("float16", 2e-3), ("float32", 1e-6)):
            body = httpx.post(url + "/pooling", json={"input": DOCUMENTS[:2], "task": "token_embed",
                                                      "encoding_format": "base64", "embed_dtype": dtype}).json()
            for item, expected in zip(body["data"], emb.embed_multi(DOCUMENTS[:2], is_query=False)):
                got = np.frombuffer(base64.b64decode(item["data"]), dtype=dtype).reshape(item["shape"])
                assert got.shape == expected.shape
                np.testing.assert_allclose(got.astype(np.float32), expected, atol=tolerance)
    finally:
        proc.kill()


def test_bulk_token_embed_writes_each_documents_vectors_for_an_index(colbert, emb, tmp_path):
    """`toolkit embed --task token_embed` (here its Python API): each row's document-mode matrix as a list of
    fixed-size (128) vectors, equal to embed_multi."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toolkit.bulk import BulkOptions, embed_files

    (tmp_path / "docs.txt").write_text("\n".join(DOCUMENTS) + "\n")
    embed_files(colbert[1].path, str(tmp_path / "docs.txt"), tmp_path / "out", BulkOptions(task="token_embed"))
    table = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).sort_by("row")
    assert table.schema.field("embedding").type == pa.list_(pa.list_(pa.float32(), 128))
    for got, expected in zip(table["embedding"].to_pylist(), emb.embed_multi(DOCUMENTS, is_query=False)):
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=1e-6)
