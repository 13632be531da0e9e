"""Step 4: optimize for the target: transformer fusions (kept only when faster),
fp16 for cuda/tensorrt, int8 dynamic quantization for cpu."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import onnx

from toolkit.export.resolve import ResolvedModel

__all__ = ["DEFAULT_INT8_FORM", "FUSED_OPS", "INT8_FORMS", "compact_embedding_table", "convert_fp16", "fuse_transformer",
           "fused_counts", "quantize_int8", "time_graphs"]

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


def fuse_transformer(src: Path, dst: Path, resolved: ResolvedModel, *, embed_layer_norm: bool = True) -> Path | None:
    """onnxruntime's transformer fusions with the head count and width from config.json.

    ``embed_layer_norm=False`` leaves the embedding lookup as plain Gather / Add / LayerNorm
    (needed to store the word-embedding table in fp16). Returns None when the architecture has
    no applicable fuser.
    """
    if resolved.arch.ort_fusion is None:
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = resolved.config
    logging.disable(logging.WARNING)  # the fuser logs and prints shape-inference chatter under many loggers
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from onnxruntime.transformers.fusion_options import FusionOptions

            fusion = FusionOptions(resolved.arch.ort_fusion)
            fusion.enable_embed_layer_norm = embed_layer_norm
            optimized = optimize_model(
                str(src), model_type=resolved.arch.ort_fusion,
                num_heads=int(cfg.get("num_attention_heads", 0)), hidden_size=int(cfg.get("hidden_size", 0)),
                opt_level=0, use_gpu=False, optimization_options=fusion,
            )
    finally:
        logging.disable(logging.NOTSET)
    optimized.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def time_graphs(paths: dict[str, Path], probes: list[dict[str, np.ndarray]], *, rounds: int = 7) -> dict[str, float]:
    """Median seconds per round (every probe once) of each graph on the CPU provider.

    Rounds are interleaved across the graphs so that a noisy machine slows
    them all alike; the probes should mix a single short input with a batch.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        sessions[name] = (session, [session.get_outputs()[0].name], [{k: v for k, v in p.items() if k in inputs} for p in probes])
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(rounds + 1):
        for name, (session, output, feeds) in sessions.items():
            start = time.perf_counter()
            for feed in feeds:
                session.run(output, feed)
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(ts)) for name, ts in times.items()}


_TABLE_MIN_ELEMENTS = 1 << 20  # only real vocabularies: a 30k x 384 table is 11.7M


def compact_embedding_table(src: Path, dst: Path) -> Path | None:
    """Store the word-embedding table in fp16: Gather(table_fp16, input_ids) -> Cast(fp32).

    The lookup is the only fp16 step; everything after it stays fp32. For all-MiniLM-L6-v2 this
    saves 22 MiB of file and of serving RSS at no measured speed cost, and moves the sentence
    embeddings by cosine 1e-7 (the parity check still holds them to 0.99999). The Cast cannot be
    constant-folded back to fp32 because it follows the Gather. Tables that any other node also
    reads (a masked-LM head tied to the embeddings) are left alone. Returns None when the graph
    has no such table. ``dst`` goes beside ``src``: weights that ``src`` keeps in external data stay there.
    """
    from onnx import external_data_helper, helper, numpy_helper

    # the graph alone: weights stored beside it stay on disk (the dynamo export writes them there), so this step
    # holds one table, not a second copy of the model
    model = onnx.load(str(src), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed = False
    for node in list(model.graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if (table is None or node.input[1] != "input_ids" or table.data_type != onnx.TensorProto.FLOAT
                or readers[table.name] != 1 or int(np.prod(table.dims)) < _TABLE_MIN_ELEMENTS):
            continue
        if external_data_helper.uses_external_data(table):
            external_data_helper.load_external_data_for_tensor(table, str(src.parent))
        half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), name=f"{table.name}_fp16")
        model.graph.initializer.remove(table)
        _store_beside(half, dst, len(model.graph.initializer))
        model.graph.initializer.append(half)
        looked_up = node.output[0]
        node.input[0], node.output[0] = half.name, f"{looked_up}_fp16"
        cast = helper.make_node("Cast", [node.output[0]], [looked_up], to=onnx.TensorProto.FLOAT, name=f"{node.name}_to_fp32")
        model.graph.node.insert(list(model.graph.node).index(node) + 1, cast)
        changed = True
    if not changed:
        return None
    onnx.save_model(model, str(dst))
    return dst


def _store_beside(tensor, model_path: Path, index: int) -> None:
    """Write ``tensor``'s bytes to a file of its own beside ``model_path`` and point the tensor at it (a graph whose
    other weights are external data keeps them external)."""
    from onnx import TensorProto, external_data_helper

    location = f"{model_path.name}.table{index}.data"
    (model_path.parent / location).write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _has_external_data(path: Path) -> bool:
    """Whether the graph keeps weights in external data (a graph past 2 GB): its rewrite must too."""
    return any(init.data_location == onnx.TensorProto.EXTERNAL
               for init in onnx.load(str(path), load_external_data=False).graph.initializer)


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (for cuda / tensorrt)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    large = _has_external_data(src)
    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=dst.name + ".data" if large else None)  # a graph past 2 GB in fp32 may stay past it
    return dst


_INT8_OPS = ("MatMul", "Attention")  # weight GEMMs: MatMul, and the fused Attention's Q, K, V projection (QAttention)


def quantizable_matmuls(path: Path) -> list[str]:
    """Names of the weight GEMMs dynamic int8 quantizes, in graph order: the MatMul nodes whose weight is a
    constant, and the fused Attention nodes (onnxruntime's, from the graph optimizer), whose input projection is
    a quarter of a BERT layer's weight arithmetic (measured on all-MiniLM-L6-v2: every MatMul in int8 1.57x our
    fp32 in one call, with the Attention nodes too 2.16x)."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in _INT8_OPS and len(n.input) > 1 and n.input[1] in constants]


# The forms of dynamic int8 the export chooses between, by measurement on the CPU at hand: each is a GEMM kernel of
# MLAS with its own speed and rounding. ``weight``: the int8 weights' type; ``reduce_range``: 7-bit weights.
INT8_FORMS: dict[str, dict] = {
    # uint8 activations x int8 weights: VNNI's vpdpbusd where the CPU has it; without VNNI, vpmaddubsw adds each
    # pair of products in 16 bits and saturates (toolkit.cpu.u8s8_saturates)
    "s8": {"weight": "int8", "reduce_range": False},
    # the same kernel with weights in [-64, 64]: a pair of products (255 x 64 x 2) cannot pass 32767, so AVX2 does
    # not saturate, at half the weights' resolution
    "s8-7bit": {"weight": "int8", "reduce_range": True},
    # uint8 x uint8 weights: MLAS widens both to 16 bits (vpmaddwd), exact sums at twice the instructions
    "u8": {"weight": "uint8", "reduce_range": False},
}
DEFAULT_INT8_FORM = "s8"


def quantize_int8(src: Path, dst: Path, *, nodes: list[str] | None = None, form: str = DEFAULT_INT8_FORM) -> Path:
    """Dynamic int8: per-channel weights on MatMul and the fused Attention, in one of ``INT8_FORMS``.

    ``nodes``: quantize only these (``quantizable_matmuls``' names; None: all); the rest stay fp32. Weights kept as
    external data stay so (a graph past 2 GB). Image towers and vision-language graphs use
    ``export.int8_weights`` (their Gemms too, one weight at a time); this one also quantizes the text graphs' fused
    Attention (QAttention), which that writer does not.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    spec = INT8_FORMS[form]
    large = _has_external_data(src)
    logging.disable(logging.WARNING)  # the quantizer warns about pre-processing on every call
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8 if spec["weight"] == "int8" else QuantType.QUInt8,
            per_channel=True, reduce_range=spec["reduce_range"], op_types_to_quantize=list(_INT8_OPS),
            nodes_to_quantize=nodes or [], use_external_data_format=large,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
    finally:
        logging.disable(logging.NOTSET)
    return dst
