"""The streaming int8 writer (``export.int8_weights``): which nodes it takes, what they compute, and its files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit import cpu
from toolkit.export.int8_weights import quantize_weights, weight_gemms

K, N = 64, 48


def _graph(path, *, external: bool):
    """x (?, K) -> Gemm(transB, bias) -> MatMul (weight shared by two nodes) x2 -> Add; plus nodes it must leave:
    a Gemm with alpha 0.5 and a MatMul of two activations."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (N, K)).astype(np.float32), "gemm_w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (N,)).astype(np.float32), "gemm_b"),
             numpy_helper.from_array(rng.normal(0, 0.2, (N, N)).astype(np.float32), "shared_w"),
             numpy_helper.from_array(rng.normal(0, 0.2, (N, K)).astype(np.float32), "scaled_w")]
    nodes = [helper.make_node("Gemm", ["x", "gemm_w", "gemm_b"], ["h"], name="gemm", transB=1),
             helper.make_node("MatMul", ["h", "shared_w"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["h", "shared_w"], ["b"], name="mm_b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add"),
             helper.make_node("Gemm", ["x", "scaled_w"], ["z"], name="gemm_half", transB=1, alpha=0.5),
             helper.make_node("MatMul", ["y", "h"], ["gram"], name="activations", ),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0])]
    nodes[5].input[1] = "ht"
    nodes.insert(5, nodes.pop())
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "gram")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data" if external else None, size_threshold=0)
    return {init.name: numpy_helper.to_array(init) for init in inits}


def _int8_product(x: np.ndarray, w: np.ndarray, *, saturating: bool) -> np.ndarray:
    """x @ w as DynamicQuantizeMatMul computes it: x uint8 with its own scale and zero point (range holding 0),
    w int8 per output column, symmetric. ``saturating`` models MLAS's u8s8 kernel without VNNI (AVX2,
    AVX-512BW): the raw uint8 x int8 products of each adjacent pair along K added in 16 bits and clamped
    (``vpmaddubsw``), then summed in 32 bits; with VNNI every product is summed in 32 bits, exactly."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    x_scale = (hi - lo) / 255.0
    zero = np.clip(np.rint(-lo / x_scale), 0, 255)
    xq = np.clip(np.rint(x / x_scale) + zero, 0, 255).astype(np.int64)  # (rows, K) uint8 values
    w_scale = np.abs(w).max(0) / 127.0
    wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int64)  # (K, N)
    if saturating:
        if xq.shape[1] % 2:  # the kernel pads K with zeros
            xq, wq = np.pad(xq, ((0, 0), (0, 1))), np.pad(wq, ((0, 1), (0, 0)))
        products = xq[:, :, None] * wq[None]  # (rows, K, N)
        raw = np.clip(products[:, 0::2] + products[:, 1::2], -32768, 32767).sum(1)
    else:
        raw = xq @ wq
    return (raw - zero * wq.sum(0)) * x_scale * w_scale


def _int8_errors(tmp_path: Path, external: bool) -> dict[str, float]:
    """Quantize the test graph, run it on this CPU, and measure ``y`` against both kernels' references
    (``exact``: VNNI, ``saturating``: AVX2) and the fp32 product; checks the written graph on the way."""
    weights = _graph(tmp_path / "g.onnx", external=external)
    assert weight_gemms(tmp_path / "g.onnx") == ["gemm", "mm_a", "mm_b"]  # alpha 0.5 and activations x activations left
    out = quantize_weights(tmp_path / "g.onnx", tmp_path / "q.onnx")
    model = onnx.load(str(out), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [k for k, v in ops.items() if v == "DynamicQuantizeMatMul"] == ["gemm", "mm_a", "mm_b"]
    assert ops["gemm_half"] == "Gemm" and ops["activations"] == "MatMul"
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert sorted(i.name for i in int8) == ["gemm_w_int8_t", "shared_w_int8"]  # the shared weight quantized once
    x = np.random.default_rng(1).normal(0, 1, (7, K)).astype(np.float32)
    y, z = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["y", "z"], {"x": x})
    np.testing.assert_allclose(z, 0.5 * x @ weights["scaled_w"].T, rtol=1e-5, atol=1e-5)
    errors = {}
    for kind, saturating in (("exact", False), ("saturating", True)):
        h = _int8_product(x, weights["gemm_w"].T, saturating=saturating) + weights["gemm_b"]
        errors[kind] = float(np.abs(y - 2 * _int8_product(h, weights["shared_w"], saturating=saturating)).max())
    errors["fp32"] = float(np.abs(y - 2 * (x @ weights["gemm_w"].T + weights["gemm_b"]) @ weights["shared_w"]).max())
    return errors


@pytest.mark.parametrize("external", [False, True])
def test_weight_gemms_become_dynamic_int8_with_their_bias_and_shared_weights_once(tmp_path, external):
    """The reference models the kernel this CPU runs (``cpu.u8s8_saturates``): exact sums on VNNI, 16-bit
    saturating pair sums on AVX2. The test's weights and activations make the two differ (by ~4 here), so it
    also tells which kernel ran."""
    errors = _int8_errors(tmp_path, external)
    kernel, other = ("saturating", "exact") if cpu.u8s8_saturates(cpu.cpu_info()["isa"]) else ("exact", "saturating")
    assert errors[kernel] < 1e-4, (cpu.describe(), errors)
    assert errors[other] > 1.0, errors  # the other kernel's answer is not this one
    assert errors["fp32"] > 1e-4  # it is int8: not the fp32 product


def test_the_saturating_reference_is_what_onnxruntime_computes_on_an_emulated_avx2_cpu(tmp_path):
    """The AVX2 half of the test above on any machine: the same check in a Python run under QEMU's user-mode
    emulation of an AMD EPYC Rome (AVX2, FMA; no AVX-512, no VNNI), where onnxruntime's MLAS picks its AVX2
    u8s8 kernel. ``.ci/run`` installs qemu-user; elsewhere the test skips, saying so."""
    # imported here: the emulated child runs this file without the suite's imports
    from conftest import run_on_emulated_avx2

    errors = run_on_emulated_avx2(__file__, str(tmp_path))
    assert errors["saturating"] < 1e-4 and errors["exact"] > 1.0, errors


def test_weights_stream_to_one_aligned_data_file_and_the_source_is_untouched(tmp_path):
    _graph(tmp_path / "g.onnx", external=True)
    before = (tmp_path / "g.onnx.data").read_bytes()
    quantize_weights(tmp_path / "g.onnx", tmp_path / "q.onnx", nodes=["mm_a"])
    assert (tmp_path / "g.onnx.data").read_bytes() == before
    model = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert [n.name for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"] == ["mm_a"]
    placed = {}
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == "q.onnx.data" and int(info["offset"]) % 4096 == 0
            placed[init.name] = int(info["offset"])
    assert {"gemm_w", "shared_w", "shared_w_int8", "scaled_w"} <= set(placed)  # mm_b keeps the fp32 shared weight
    assert len(set(placed.values())) == len(placed)


def test_module_kinds_name_each_repeated_module_once(tmp_path):
    """A kind is the exporter's module path with its layer index as ``*``; without that record, the weight's name."""
    from toolkit.export.vision_language_int8 import module_kinds

    _graph(tmp_path / "g.onnx", external=False)
    model = onnx.load(str(tmp_path / "g.onnx"))
    scopes = {"mm_a": "['', 'model.layers.0', 'model.layers.0.mlp.down_proj', 'linear']",
              "mm_b": "['', 'model.layers.11', 'model.layers.11.mlp.down_proj', 'linear_7']"}
    for node in model.graph.node:
        if node.name in scopes:
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes[node.name])
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert module_kinds(tmp_path / "g.onnx") == {"gemm_w": ["gemm"], "model.layers.*.mlp.down_proj": ["mm_a", "mm_b"]}


def test_which_cpus_saturate():
    assert not cpu.u8s8_saturates(["avx2", "avx512f", "avx512bw", "avx512_vnni"])  # Ice Lake, Zen 4
    assert not cpu.u8s8_saturates(["avx2", "avx_vnni"])  # Alder Lake: AVX-VNNI on 256 bits
    assert cpu.u8s8_saturates(["avx2"])  # Haswell to Zen 3
    assert cpu.u8s8_saturates(["avx2", "avx512f", "avx512bw"])  # Skylake-SP: vpmaddubsw on 512 bits
    assert cpu.u8s8_saturates("Intel Xeon (avx2 avx512bw avx512f)")  # as an artifact's int8_gated_on records it


if __name__ == "__main__":  # the emulated-AVX2 test's child: prints the errors as one JSON line
    print(json.dumps(_int8_errors(Path(sys.argv[1]), external=False)))
