"""GPU paths: CUDA / TensorRT providers, IO binding, fp16 artifacts. Skipped where no GPU is usable."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import _export

from toolkit.runtime import Embedder
from toolkit.runtime.session import usable_devices
from toolkit.settings import Device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(Device.CUDA not in usable_devices(), reason="no usable CUDA provider (GPU + onnxruntime-gpu)"),
]

TEXTS = ["What is the capital of France?", "short", "IO binding keeps the tensors on the device between runs."]


def test_cuda_embedder_binds_io_and_matches_cpu(minilm_artifact):
    gpu = Embedder(minilm_artifact, device="cuda")
    assert gpu.device == Device.CUDA and gpu.session._binding
    cpu = Embedder(minilm_artifact, device="cpu")
    a, b = gpu.embed(TEXTS), cpu.embed(TEXTS)
    assert ((a * b).sum(-1)).min() >= 0.99999
    tokens = gpu.encode(TEXTS, pooling_task="token_embed")
    assert [t.shape[0] for t in tokens] == [len(gpu.tokenize(t)) for t in TEXTS]


def test_fp16_cuda_artifact(tmp_path):
    result = _export(None, tmp_path / "fp16.onnx", precision="fp16", target="cuda")
    parity = result.manifest.parity
    assert parity.passed and min(parity.min_cosine.values()) >= 0.999
    emb = Embedder(result.path, device="cuda")
    vec = emb.embed(TEXTS)
    assert vec.dtype == np.float32 and vec.shape == (3, 384)


@pytest.mark.skipif(Device.TENSORRT not in usable_devices(), reason="TensorRT libraries not loadable")
def test_tensorrt_runs_the_fp16_artifact(tmp_path, minilm_artifact):
    trt = Embedder(minilm_artifact, device="tensorrt")
    cpu = Embedder(minilm_artifact, device="cpu")
    assert ((trt.embed(TEXTS) * cpu.embed(TEXTS)).sum(-1)).min() >= 0.999
