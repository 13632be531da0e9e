"""Accuracy-guided int8: quantize the MatMuls the embeddings tolerate, keep the rest fp32.

Plain dynamic quantization of every MatMul costs all-MiniLM-L6-v2 its
neighbourhoods (top-10 overlap 0.90 vs fp32 on the corpus, measured), and the
loss is spread over every layer: one MatMul alone already moves the overlap
by 0.005-0.05. So the exporter measures each MatMul's damage on its own,
orders them from harmless to harmful, and keeps the longest prefix of that
order whose whole-model quantization still passes the gate (binary search:
damage grows with the prefix, near enough to monotone).

Before the search, activation outliers are moved into the weights (SmoothQuant's
per-channel scaling): dynamic quantization gives each MatMul's input ONE scale
for the whole batch, so a few large channels (the FFN's GELU outputs) leave the
rest a handful of levels. Each input channel j is divided by
s_j = max|x_j|^a / max|w_j|^(1-a) (a Mul before the MatMul) and the weight's row
j multiplied by it: the same product in exact arithmetic (fp32 cosine vs the
unscaled graph 1 - 3e-13, measured), calibrated on corpus texts the gate does not
use. On all-MiniLM-L6-v2 (AMD EPYC, AVX-512 VNNI) it lets 16 of 18 MatMuls pass
the gate instead of 11; a = 0.7 measured best among 0.5-1.0 (every MatMul int8:
top-10 overlap 0.862 / 0.926 / 0.924 / 0.910 / 0.891 at 0.5 / 0.7 / 0.8 / 0.9 /
1.0, against 0.899 unscaled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.export.optimize import (
    DEFAULT_INT8_FORM,
    INT8_FORMS,
    quantizable_matmuls,
    quantize_int8,
    time_graphs,
)
from toolkit.export.parity import neighbour_overlap
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.pooling import cosines
from toolkit.runtime.tokenization import Tokenizer, pad_batch
from toolkit.settings import RuntimeOptions

__all__ = ["SMOOTHING_ALPHA", "Int8Choice", "Probe", "choose_for_model", "choose_int8_nodes", "int8_gate",
           "smooth_activations"]

SMOOTHING_ALPHA = 0.7  # how much of an input channel's range moves into the weight (SmoothQuant's alpha)
MIN_OVERLAP = 0.95
_GATE_TEXTS = 500  # the gate's texts: the search measures its choice on them once
_RANK_TEXTS = 200
_CALIBRATION_TEXTS = 200  # activation ranges for the smoothing: the corpus texts after the gate's
_TIMING_BATCH = 32  # the forms are timed on one text and on a batch of this many
_TIMING_NOISE = 0.03  # forms timed within 3% of each other run alike (a 2-core VM's medians spread about that)


@dataclass(frozen=True)
class Int8Choice:
    path: Path
    quantized: list[str]  # MatMul nodes in int8
    total: int  # quantizable MatMuls in the graph
    overlap: float  # top-10 neighbour overlap vs fp32 on the probe corpus
    min_cosine: float  # vs fp32
    smoothing: float | None = None  # the activation smoothing's alpha (None: the MatMuls' inputs as exported)
    form: str = DEFAULT_INT8_FORM  # INT8_FORMS' name of the kernel form
    seconds: float | None = None  # its time on the timing feeds, where forms were timed against each other
    forms: dict[str, dict] = dataclasses.field(default_factory=dict)  # every form searched: its summary()

    def summary(self) -> dict:
        """What the manifest records of a form's search: MatMuls in int8, the gate's measures, its time."""
        facts = {"matmuls": f"{len(self.quantized)}/{self.total}", "top10_overlap": round(self.overlap, 4),
                 "min_cosine": round(self.min_cosine, 5)}
        if self.seconds is not None:
            facts["ms"] = round(self.seconds * 1e3, 2)
        return facts


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

    def channel_ranges(self, graph: Path, tensors: list[str]) -> dict[str, np.ndarray]:
        """max |x| per last-axis channel of each of ``tensors`` (intermediate values of ``graph``) over the probe's
        real tokens (padding positions left out)."""
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(graph))
        for name in tensors:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        ranges: dict[str, np.ndarray] = {}
        for _, feeds in self._batches:
            mask = feeds["attention_mask"].astype(bool)
            for name, x in zip(tensors, session.run(tensors, {k: v for k, v in feeds.items() if k in names})):
                rows = x[mask] if x.ndim == 3 and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
                peak = np.abs(rows).max(0)
                ranges[name] = peak if name not in ranges else np.maximum(ranges[name], peak)
        return ranges

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


def smooth_activations(fp32: Path, dst: Path, calibration: Probe, alpha: float = SMOOTHING_ALPHA) -> Path:
    """``fp32`` with every quantizable MatMul's input channels scaled down and its weight rows scaled up by
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), ranges measured on ``calibration`` (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    nodes = set(quantizable_matmuls(fp32))
    model = onnx.load(str(fp32))
    matmuls = [n for n in model.graph.node if n.name in nodes]
    ranges = calibration.channel_ranges(fp32, sorted({n.input[0] for n in matmuls}))
    weights = {init.name: init for init in model.graph.initializer}
    scaled: list = []
    for node in matmuls:
        weight_name = node.input[1]
        weight = numpy_helper.to_array(weights[weight_name]).astype(np.float32)  # (in, out)
        x_peak = np.maximum(ranges[node.input[0]], 1e-5)
        w_peak = np.maximum(np.abs(weight).max(1), 1e-5)
        scale = (x_peak ** alpha / w_peak ** (1 - alpha)).astype(np.float32)
        smoothed_name = f"{weight_name}_smoothed_{len(scaled)}"  # a weight shared by two MatMuls is copied
        model.graph.initializer.append(numpy_helper.from_array(weight * scale[:, None], smoothed_name))
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{node.name}_smoothing")
        model.graph.initializer.append(inverse)
        scaled_input = f"{node.name}_smoothed_input"
        scaled.append((node, helper.make_node("Mul", [node.input[0], inverse.name], [scaled_input],
                                              name=f"{node.name}_smooth")))
        node.input[0], node.input[1] = scaled_input, smoothed_name
    ordered = []  # each Mul right before its MatMul keeps the graph topologically sorted
    muls = {id(node): mul for node, mul in scaled}
    for node in model.graph.node:
        if id(node) in muls:
            ordered.append(muls[id(node)])
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    used = {i for n in model.graph.node for i in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1_500_000_000)
    return dst


def choose_int8_nodes(fp32: Path, tmp: Path, *, rank_probe: Probe, gate_probe: Probe, min_overlap: float,
                      min_cosine: float, calibration: Probe | None = None, forms: tuple[str, ...] = (DEFAULT_INT8_FORM,),
                      timing: list[dict[str, np.ndarray]] | None = None,
                      report: Callable[[str], None] = lambda _msg: None) -> Int8Choice:
    """Quantize as many MatMuls as the gate allows; the gate is measured on ``gate_probe`` against ``fp32``.
    With a ``calibration`` probe the MatMuls' inputs are smoothed first (``smooth_activations``).

    With several ``forms`` (``INT8_FORMS``' names) and ``timing`` feeds, the kernels' speed and rounding differ by
    CPU, so the forms are measured here: each with every MatMul in int8 is timed (``time_graphs``), the form that
    could be fastest is searched first, and the others in turn, each on the one shared order (the MatMuls' damage
    measured alone in the first form searched); a form whose every-MatMul time is no faster than the best passing
    choice so far is not searched. The fastest passing choice is kept; ``forms`` of the result holds what each form
    measured (``all_int8_ms``: every MatMul in int8, the form's ceiling)."""
    nodes = quantizable_matmuls(fp32)
    reference = gate_probe.vectors(fp32)
    rank_reference = rank_probe.vectors(fp32)
    source, alpha = fp32, None
    if calibration is not None and nodes:
        report("moving activation outliers into the weights (calibrating)")
        source, alpha = smooth_activations(fp32, tmp / "smoothed.onnx", calibration), SMOOTHING_ALPHA
        nodes = quantizable_matmuls(source)

    def measure(subset: list[str], probe: Probe, ref: np.ndarray, form: str) -> tuple[float, float, Path]:
        path = quantize_int8(source, tmp / f"int8-{form}-{len(subset)}.onnx", nodes=subset, form=form)
        vec = probe.vectors(path)
        return neighbour_overlap(vec, ref), float(cosines(vec, ref).min()), path

    def passes(overlap: float, cos: float, *_path) -> bool:
        return overlap >= min_overlap and cos >= min_cosine

    order: list[str] | None = None

    def search(form: str, full: tuple[float, float, Path]) -> Int8Choice:
        nonlocal order
        if passes(*full) or not nodes:
            return Int8Choice(full[2], nodes, len(nodes), full[0], full[1], alpha, form)
        if order is None:
            damage = {}
            for k, node in enumerate(nodes):
                report(f"measuring MatMul {k + 1}/{len(nodes)} alone ({form})")
                overlap, cos, _ = measure([node], rank_probe, rank_reference, form)
                damage[node] = (1.0 - overlap) + 10.0 * (1.0 - cos)
            order = sorted(nodes, key=damage.__getitem__)
        best, lo, hi = None, 1, len(nodes) - 1  # the largest passing prefix in [lo, hi]
        while lo <= hi:
            mid = (lo + hi) // 2
            report(f"trying {mid} of {len(nodes)} MatMuls in int8 ({form})")
            result = measure(order[:mid], gate_probe, reference, form)
            if passes(*result):
                best, lo = (mid, result), mid + 1
            else:
                hi = mid - 1
        if best is None:  # not even the most harmless one passes: the full quantization, which the gate refuses
            return Int8Choice(full[2], nodes, len(nodes), full[0], full[1], alpha, form)
        count, (overlap, cos, path) = best
        return Int8Choice(path, order[:count], len(nodes), overlap, cos, alpha, form)

    fulls = {form: measure(nodes, gate_probe, reference, form) for form in forms}  # every GEMM in int8
    if len(forms) == 1 or not timing:
        chosen = search(forms[0], fulls[forms[0]])
        return dataclasses.replace(chosen, forms={forms[0]: chosen.summary()})
    report(f"timing {len(forms)} int8 forms with every MatMul in int8")
    ceiling = time_graphs({form: full[2] for form, full in fulls.items()}, timing)
    facts = {form: {"all_int8_ms": round(ceiling[form] * 1e3, 2)} for form in forms}
    searched: dict[str, Int8Choice] = {}
    passing: dict[str, Int8Choice] = {}
    lead: tuple[Int8Choice, float] | None = None  # the best passing choice so far, its time in the last comparison
    for form in sorted(forms, key=ceiling.__getitem__):  # the form that could be fastest first
        if lead is not None and ceiling[form] > lead[1] * (1 + _TIMING_NOISE):
            facts[form]["searched"] = f"no: slower with every MatMul in int8 than {lead[0].form} as chosen"
            continue
        choice = searched[form] = search(form, fulls[form])
        facts[form].update(choice.summary())
        if passes(choice.overlap, choice.min_cosine):
            passing[form] = choice
            if lead is None:
                lead = choice, time_graphs({form: choice.path}, timing)[form]
            else:
                seconds = time_graphs({form: choice.path, lead[0].form: lead[0].path}, timing)
                a, b = (choice, seconds[form]), (lead[0], seconds[lead[0].form])
                lead = a if _better(*a, *b) else b
    if not passing:  # no form passes (so each was searched): the first one's choice, which the gate refuses
        return dataclasses.replace(searched[forms[0]], forms=facts)
    final = {lead[0].form: lead[1]}
    if len(passing) > 1:  # the choice and the record from one interleaved run of every passing form
        report(f"timing the {len(passing)} forms that pass the gate")
        final = time_graphs({form: c.path for form, c in passing.items()}, timing)
        for form in final:
            if not _better(passing[lead[0].form], final[lead[0].form], passing[form], final[form]):
                lead = passing[form], final[form]
    for form, seconds in final.items():
        facts[form]["ms"] = round(seconds * 1e3, 2)
    return dataclasses.replace(lead[0], seconds=lead[1], forms=facts)


def _better(a: Int8Choice, a_seconds: float, b: Int8Choice, b_seconds: float) -> bool:
    """Whether choice ``a`` beats ``b``: faster beyond the timing's noise, or as fast within it and more accurate
    (top-10 overlap, then min cosine: on one kernel, 8-bit and 7-bit weights run alike and 8 bits keep more)."""
    if abs(a_seconds - b_seconds) > _TIMING_NOISE * min(a_seconds, b_seconds):
        return a_seconds < b_seconds
    return (a.overlap, a.min_cosine) > (b.overlap, b.min_cosine)


def choose_for_model(fp32: Path, tmp: Path, resolved, tokenizer: Tokenizer, pad_id: int,
                     form: str | None = None) -> Int8Choice:
    """The export's int8 search for a text graph: the gate on 500 corpus texts, the ranking on 200 of them, the
    smoothing calibrated on 200 texts the gate does not see (``resolved``: the export's ResolvedModel); in ``form``
    (``INT8_FORMS``' name; None: each of them searched, the fastest passing one kept, timed on one corpus text and
    a batch of 32)."""
    from toolkit.corpus import load_corpus
    from toolkit.export.parity import THRESHOLDS

    texts = load_corpus(limit=_GATE_TEXTS + _CALIBRATION_TEXTS)
    common = {"pad_id": pad_id, "padding_side": resolved.card.padding_side, "type_ids": resolved.arch.token_type_ids}
    gate = Probe(texts[:_GATE_TEXTS], tokenizer, **common)
    rank = Probe(texts[:_RANK_TEXTS], tokenizer, **common)
    calibration = Probe(texts[_GATE_TEXTS:], tokenizer, **common)  # texts the gate does not see
    items = tokenizer.encode(texts[:_TIMING_BATCH], truncate=-1)
    timing = [pad_batch(batch, pad_id=pad_id, side=resolved.card.padding_side, type_ids=resolved.arch.token_type_ids)
              for batch in (items[:1], items)]
    return choose_int8_nodes(fp32, tmp, rank_probe=rank, gate_probe=gate, min_overlap=MIN_OVERLAP,
                             min_cosine=THRESHOLDS["int8"], calibration=calibration,
                             forms=(form,) if form else tuple(INT8_FORMS), timing=timing)


def int8_gate(report, choice: Int8Choice):
    """The int8 gate on the search's own measurement of the chosen MatMuls (500 corpus texts vs the fp32 graph:
    top-10 neighbour overlap and min cosine), measured once, plus the sentence outputs' parity vs PyTorch
    (``report``: the export's ParityReport)."""
    import msgspec

    # int8 gates the sentence-level outputs; token_embeddings are reported, not gated
    sentence_ok = all(v >= report.threshold for k, v in report.min_cosine.items() if k != "token_embeddings")
    passed = sentence_ok and choice.overlap >= MIN_OVERLAP and choice.min_cosine >= report.threshold
    return msgspec.structs.replace(report, retrieval_top10_overlap=choice.overlap, vs_fp32_min_cosine=choice.min_cosine,
                                   passed=passed)
