"""Accuracy-guided int8: quantize the MatMuls the embeddings tolerate, keep the rest fp32.

Plain dynamic quantization of every MatMul costs all-MiniLM-L6-v2 its
neighbourhoods (top-10 overlap 0.90 vs fp32 on the corpus, measured), and the
loss is spread over every layer: one MatMul alone already moves the overlap
by 0.005-0.05. So the exporter measures each MatMul's damage on its own,
orders them from harmless to harmful, and keeps the longest prefix of that
order whose whole-model quantization still passes the gate (binary search:
damage grows with the prefix, near enough to monotone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.export.optimize import quantizable_matmuls, quantize_int8
from toolkit.export.parity import neighbour_overlap
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.pooling import cosines
from toolkit.runtime.tokenization import Tokenizer, pad_batch
from toolkit.settings import RuntimeOptions

__all__ = ["Int8Choice", "Probe", "choose_int8_nodes"]


@dataclass(frozen=True)
class Int8Choice:
    path: Path
    quantized: list[str]  # MatMul nodes in int8
    total: int  # quantizable MatMuls in the graph
    overlap: float  # top-10 neighbour overlap vs fp32 on the probe corpus
    min_cosine: float  # vs fp32


class Probe:
    """Corpus texts, tokenized and batched once, run through raw onnxruntime sessions."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer, *, pad_id: int, padding_side, type_ids: bool,
                 output: str = "sentence_embedding") -> None:
        items = tokenizer.encode(texts, truncate=-1)
        self._batches = []
        runtime = RuntimeOptions()  # the runtime's own batches: int8 activation scales depend on the batch
        for batch in plan_batches([len(t) for t in items], max_batch_tokens=runtime.max_batch_tokens,
                                  max_batch_size=runtime.max_batch_size):
            feeds = pad_batch([items[i] for i in batch], pad_id=pad_id, side=padding_side, type_ids=type_ids)
            self._batches.append((batch, feeds))
        self._n = len(items)
        self._output = output

    def vectors(self, graph: Path) -> np.ndarray:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        out = None
        for batch, feeds in self._batches:
            (vec,) = session.run([self._output], {k: v for k, v in feeds.items() if k in names})
            if out is None:
                out = np.zeros((self._n, vec.shape[-1]), dtype=np.float32)
            out[batch] = vec
        return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def choose_int8_nodes(fp32: Path, tmp: Path, *, rank_probe: Probe, gate_probe: Probe, min_overlap: float,
                      min_cosine: float, report: Callable[[str], None] = lambda _msg: None) -> Int8Choice:
    """Quantize as many MatMuls as the gate allows; the gate is measured on ``gate_probe``."""
    nodes = quantizable_matmuls(fp32)
    reference = gate_probe.vectors(fp32)
    rank_reference = rank_probe.vectors(fp32)

    def measure(subset: list[str], probe: Probe, ref: np.ndarray) -> tuple[float, float, Path]:
        path = quantize_int8(fp32, tmp / f"int8-{len(subset)}.onnx", nodes=subset)
        vec = probe.vectors(path)
        return neighbour_overlap(vec, ref), float(cosines(vec, ref).min()), path

    def passes(result: tuple[float, float, Path]) -> bool:
        return result[0] >= min_overlap and result[1] >= min_cosine

    full = measure(nodes, gate_probe, reference)
    if passes(full) or not nodes:
        return Int8Choice(full[2], nodes, len(nodes), full[0], full[1])
    damage = {}
    for k, node in enumerate(nodes):
        report(f"measuring MatMul {k + 1}/{len(nodes)} alone")
        overlap, cos, _ = measure([node], rank_probe, rank_reference)
        damage[node] = (1.0 - overlap) + 10.0 * (1.0 - cos)
    order = sorted(nodes, key=damage.__getitem__)
    best, lo, hi = None, 1, len(nodes) - 1  # the largest passing prefix in [lo, hi]
    while lo <= hi:
        mid = (lo + hi) // 2
        report(f"trying {mid} of {len(nodes)} MatMuls in int8")
        result = measure(order[:mid], gate_probe, reference)
        if passes(result):
            best, lo = (mid, result), mid + 1
        else:
            hi = mid - 1
    if best is None:  # not even the most harmless one passes: return the full quantization, the gate refuses it
        return Int8Choice(full[2], nodes, len(nodes), full[0], full[1])
    count, (overlap, cos, path) = best
    return Int8Choice(path, order[:count], len(nodes), overlap, cos)
