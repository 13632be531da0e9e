"""The OpenAPI document is good enough to build a client from: openapi-python-client generates one from a
live ``toolkit serve``'s ``/openapi.json`` (offline), and that client embeds, reranks and scores, each 200
parsed into its typed model (a route whose 200 had no schema would parse to ``None``).

The generator pins ``typer<0.28`` and the toolkit's constraints pin ``typer==0.29.2``, so it cannot share
``.venv``: it runs from its own virtualenv under ``.cache/tools`` (built on first use from the package
index) unless one is installed next to this interpreter. The generated package itself needs only httpx and
attrs, which ``.venv`` has, and is imported here.
"""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, serve_subprocess

from toolkit.runtime import Embedder

GENERATOR = "openapi-python-client==0.29.1"
TOOL_VENV = ROOT / ".cache" / "tools" / "openapi-python-client"
BIN = "Scripts" if os.name == "nt" else "bin"
PACKAGE = "toolkit_generated_client"
KEY = "client-key"


def _generator() -> Path:
    """The openapi-python-client executable: next to this interpreter, else in the virtualenv that
    scripts/setup.sh builds for it (it pins an older typer than the toolkit, so it cannot share .venv)."""
    beside = Path(sys.executable).parent / "openapi-python-client"
    if beside.exists():
        return beside
    exe = TOOL_VENV / BIN / "openapi-python-client"
    if not exe.exists():
        if sys.version_info < (3, 11):
            pytest.skip(f"{GENERATOR} needs Python >= 3.11 (scripts/setup.sh skips it on {sys.version.split()[0]})")
        pytest.fail(f"{exe} is missing: run scripts/setup.sh (it installs {GENERATOR} there)")
    return exe


@pytest.fixture(scope="module")
def live(minilm_artifact):
    url, _, proc = serve_subprocess(minilm_artifact, env={"TOOLKIT_API_KEY": KEY})
    yield url
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def minilm(minilm_artifact):
    return Embedder(minilm_artifact, device="cpu")


@pytest.fixture(scope="module")
def generated(live, tmp_path_factory):
    """The client package generated from the live server's /openapi.json (fetched without the API key)."""
    folder = tmp_path_factory.mktemp("generated")
    response = httpx.get(live + "/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    (folder / "openapi.json").write_bytes(response.content)
    (folder / "config.yaml").write_text(f"post_hooks: []\npackage_name_override: {PACKAGE}\n")  # no ruff run
    done = subprocess.run([str(_generator()), "generate", "--path", str(folder / "openapi.json"), "--meta", "none",
                           "--config", str(folder / "config.yaml"), "--output-path", str(folder / PACKAGE)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr  # nothing skipped
    sys.path.insert(0, str(folder))
    try:
        package = importlib.import_module(PACKAGE)
        importlib.import_module(PACKAGE + ".models")  # package.models: every schema's model
        yield package
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(generated, module: str):
    return importlib.import_module(f"{generated.__name__}.api.{module}")


@pytest.fixture(scope="module")
def client(generated, live):
    with generated.AuthenticatedClient(base_url=live, token=KEY, raise_on_unexpected_status=True) as c:
        yield c


def test_generated_client_embeds(generated, client, minilm):
    models = generated.models
    embeddings = _api(generated, "open_ai.v1_embeddings_embeddings")
    texts = ["ONNX Runtime runs exported graphs", "the weather is sunny today"]
    result = embeddings.sync(client=client, body=models.OpenAIEmbeddingRequest(input_=texts, model="all-MiniLM-L6-v2"))
    assert isinstance(result, models.OpenAIEmbeddingResponse), result
    assert [d.index for d in result.data] == [0, 1] and result.model == "all-MiniLM-L6-v2"
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, minilm.embed(texts), atol=1e-5)
    assert isinstance(result.usage, models.UsageInfo) and result.usage.prompt_tokens == minilm.count_tokens(texts)

    as_base64 = embeddings.sync(client=client, body=models.OpenAIEmbeddingRequest(
        input_=texts[0], encoding_format=models.OpenAIEmbeddingRequestEncodingFormat.BASE64))
    row = np.frombuffer(base64.b64decode(as_base64.data[0].embedding), dtype=np.float32)
    np.testing.assert_allclose(row, vectors[0], atol=1e-6)

    listed = _api(generated, "open_ai.v1_models_models").sync(client=client)
    assert isinstance(listed, models.ModelList)
    assert [(m.id, m.dimensions, m.task) for m in listed.data] == [("all-MiniLM-L6-v2", 384, "embed")]


def test_generated_client_reranks(generated, client, minilm):
    models = generated.models
    query = "how do I run an ONNX graph"
    documents = ["ONNX Runtime executes graphs fast", "the weather is sunny today", "my cat sleeps all day"]
    expected = minilm.score(query, documents)
    cohere = _api(generated, "rerank.v2_rerank_rerank_v2").sync(client=client, body=models.VLLMRerankRequest(
        query=query, documents=documents, top_n=2, return_documents=True))
    assert isinstance(cohere, models.CohereRerankResponse), cohere
    assert [r.index for r in cohere.results] == np.argsort(-expected)[:2].tolist() and cohere.results[0].index == 0
    assert cohere.results[0].document.text == documents[0]
    np.testing.assert_allclose([r.relevance_score for r in cohere.results], np.sort(expected)[::-1][:2], atol=1e-5)
    assert cohere.meta.billed_units.search_units == 1 and cohere.usage.total_tokens > 0

    vllm = _api(generated, "rerank.v1_rerank_rerank_v1").sync(client=client, body=models.VLLMRerankRequest(
        query=query, documents=documents))
    assert isinstance(vllm, models.VLLMRerankResponse), vllm
    assert [r.index for r in vllm.results] == np.argsort(-expected).tolist()
    assert [r.document.text for r in vllm.results] == [documents[i] for i in np.argsort(-expected)]


def test_generated_client_scores(generated, client, minilm):
    models = generated.models
    query, documents = "a fast ONNX runtime", ["ONNX Runtime is fast", "bananas are yellow"]
    result = _api(generated, "v_llm_extras.v1_score_score").sync(client=client, body=models.ScoreRequest(
        queries=query, documents=documents))
    assert isinstance(result, models.ScoreResponse), result
    scores = np.array([d.score for d in result.data])
    assert np.all((scores >= -1) & (scores <= 1)) and scores[0] > scores[1]
    vectors = minilm.embed([query, *documents])
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-5)  # cosines of unit vectors
    np.testing.assert_allclose(scores, minilm.score(query, documents), atol=1e-6)


def test_generated_client_parses_errors(generated, live):
    """A documented error parses into its model too: a wrong key is OpenAI's 401 shape."""
    models = generated.models
    with generated.AuthenticatedClient(base_url=live, token="wrong") as wrong:
        result = _api(generated, "open_ai.v1_embeddings_embeddings").sync(
            client=wrong, body=models.OpenAIEmbeddingRequest(input_="x"))
    assert isinstance(result, models.OpenAIError) and result.error.code == 401
