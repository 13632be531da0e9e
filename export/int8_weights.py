"""Dynamic int8 for large graphs, written one weight at a time.

onnxruntime's ``quantize_dynamic`` loads the whole graph, holds every weight
twice and saves it in one piece: quantizing a 2B vision-language model's 6 GB
language graph took 14+ GiB on top of the exporter (measured: killed at
24 GiB). It also leaves ``Gemm`` nodes alone (dynamic quantization has no
Gemm), and the dynamo exporter writes a vision tower's linear layers as
``Gemm``: Qwen2-VL's vision graph kept all 130 of them in fp32.

This writer reads each weight from the source's external data, quantizes it
and streams it to the new data file, so memory holds one fp32 weight at a time
(plus the int8 weights until they are written: a quarter of their fp32 size).
Each chosen ``MatMul`` / ``Gemm`` with a constant 2-D weight becomes
onnxruntime's ``DynamicQuantizeMatMul``: the input quantized per call (uint8,
its own scale), the weight signed int8 per output column, symmetric, the
Gemm's bias added in the same kernel (the form onnxruntime's optimizer makes
of ``quantize_dynamic``'s per-channel MatMul, and the kernel that ran there:
MLAS's u8s8 GEMM, VNNI where the CPU has it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

__all__ = ["quantize_weights", "weight_gemms"]

_ALIGN = 4096  # each tensor at a page boundary: onnxruntime can map it instead of copying


def _weight_form(node, constants: dict) -> tuple[str, bool, str | None] | None:
    """(weight name, transposed, bias name) of a MatMul / Gemm whose weight is a constant 2-D float tensor."""
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    weight = constants[node.input[1]]
    if weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
        return None
    if node.op_type == "MatMul":
        return node.input[1], False, None
    if node.op_type != "Gemm":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        tensor = constants.get(bias)
        n = weight.dims[0] if attrs.get("transB", 0) else weight.dims[1]
        if tensor is None or tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) != n:
            return None  # a bias that is not one value per output column
    return node.input[1], bool(attrs.get("transB", 0)), bias


def weight_gemms(path: Path) -> list[str]:
    """Names of the nodes ``quantize_weights`` can quantize, in graph order: MatMul and Gemm (alpha = beta = 1, A
    not transposed, a bias per output column) whose weight is a constant 2-D float tensor."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {init.name: init for init in model.graph.initializer}
    return [n.name for n in model.graph.node if _weight_form(n, constants) is not None]


def quantize_weights(src: Path, dst: Path, *, nodes: Iterable[str] | None = None) -> Path:
    """``src`` with ``nodes`` (``weight_gemms``' names; None: all of them) as DynamicQuantizeMatMul, written to
    ``dst`` with every weight in one external data file beside it (``dst.name + '.data'``)."""
    model = onnx.load(str(src), load_external_data=False)
    base = str(Path(src).parent)
    constants = {init.name: init for init in model.graph.initializer}
    chosen = None if nodes is None else set(nodes)
    data_name = dst.name + ".data"
    quantized: dict[tuple[str, bool], tuple[str, str]] = {}  # (weight, transposed) -> (int8 name, scale name)
    new_tensors: list = []
    rewritten = []
    for node in model.graph.node:
        form = _weight_form(node, constants)
        if form is None or (chosen is not None and node.name not in chosen):
            rewritten.append(node)
            continue
        weight, transposed, bias = form
        if (weight, transposed) not in quantized:
            w = numpy_helper.to_array(constants[weight], base_dir=base).astype(np.float32, copy=False)
            w = w.T if transposed else w  # (in, out)
            peak = np.abs(w).max(axis=0)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            names = (f"{weight}_int8{'_t' if transposed else ''}", f"{weight}_scale{'_t' if transposed else ''}")
            new_tensors += [numpy_helper.from_array(np.ascontiguousarray(q), names[0]),
                            numpy_helper.from_array(scale, names[1])]
            quantized[(weight, transposed)] = names
            del w, q
        q_name, scale_name = quantized[(weight, transposed)]
        inputs = [node.input[0], q_name, scale_name, "", ""]
        if bias is not None:
            flat = f"{bias}_flat"
            if flat not in constants:
                b = numpy_helper.to_array(constants[bias], base_dir=base).astype(np.float32).reshape(-1)
                constants[flat] = numpy_helper.from_array(b, flat)
                new_tensors.append(constants[flat])
            inputs[4] = flat
        else:
            del inputs[3:]
        rewritten.append(helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output),
                                          name=node.name, domain="com.microsoft"))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used] + \
        [t for t in new_tensors if t.name in used]
    del model.graph.initializer[:]
    del model.graph.value_info[:]  # the rewritten nodes' outputs keep their shapes; stale entries could contradict
    with open(dst.parent / data_name, "wb") as data:
        for tensor in kept:  # one tensor's bytes in memory at a time (external ones are copied, never all loaded)
            if tensor.data_location == TensorProto.EXTERNAL or tensor.HasField("raw_data"):
                raw = numpy_helper.to_array(tensor, base_dir=base).tobytes()
                fresh = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
                fresh.raw_data = raw
                if len(raw) >= 1024:  # small tensors stay in the graph
                    data.write(b"\0" * (-data.tell() % _ALIGN))
                    external_data_helper.set_external_data(fresh, location=data_name, offset=data.tell(),
                                                           length=len(raw))
                    fresh.data_location = TensorProto.EXTERNAL
                    fresh.ClearField("raw_data")
                    data.write(raw)
                tensor = fresh
                del raw
            model.graph.initializer.append(tensor)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return dst

