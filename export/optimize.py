"""Step 4: optimize for the target: transformer fusions (kept only when faster),
fp16 for cuda/tensorrt, int8 dynamic quantization for cpu."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from toolkit.export.resolve import ResolvedModel

__all__ = ["FUSED_OPS", "convert_fp16", "fuse_transformer", "fused_counts", "quantize_int8", "time_graph"]

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
             "EmbedLayerNormalization", "LayerNormalization", "SimplifiedLayerNormalization",
             "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger")


def fused_counts(path: Path) -> dict[str, int]:
    """Counts of the fused / specialised operators in a graph."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def fuse_transformer(src: Path, dst: Path, resolved: ResolvedModel) -> Path | None:
    """onnxruntime's transformer fusions with the head count and width from config.json.

    Returns None when the architecture has no applicable fuser.
    """
    if resolved.arch.ort_fusion is None:
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = resolved.config
    optimized = optimize_model(
        str(src), model_type=resolved.arch.ort_fusion,
        num_heads=int(cfg.get("num_attention_heads", 0)), hidden_size=int(cfg.get("hidden_size", 0)),
        opt_level=0, use_gpu=False,
    )
    optimized.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def time_graph(path: Path, feeds: dict[str, np.ndarray], *, repeats: int = 8) -> float:
    """Median seconds of one run on the CPU provider (after a warm-up)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    output = [session.get_outputs()[0].name]
    session.run(output, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(output, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (for cuda / tensorrt)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save_model(model, str(dst))
    return dst


def quantize_int8(src: Path, dst: Path, *, exclude: list[str] | None = None) -> Path:
    """Dynamic int8: signed per-channel weights on MatMul (s8 measured faster than u8 here)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude or [],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    return dst
