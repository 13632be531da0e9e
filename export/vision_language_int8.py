"""int8 for vision-language models: the kinds of layer the embeddings tolerate in int8, the rest kept fp32.

A kind is one linear module repeated through a graph (``model.language_model.layers.*.mlp.down_proj``,
``visual.blocks.*.attn.qkv``), from the exporter's record of each node's module. Measured on a 2B-shaped
Qwen2-VL (random weights, 4 images + text and 2 texts; min cosine vs our fp32 with that kind alone in int8):
the language model's ``down_proj`` 0.9875, ``o_proj`` 0.9959, ``v_proj`` 0.9982, ``gate_proj`` / ``up_proj``
0.9989, ``q_proj`` / ``k_proj`` 0.99996; the whole vision tower 0.9958; everything 0.980 (below int8's 0.99).
The damage of several kinds adds up (1 - cosine nearly sums), so the search measures each kind alone, orders
them from harmless to harmful and keeps the longest prefix of that order that still passes (binary search),
as the text models' per-MatMul search does (``export.int8``) but per kind: a 2B model has 326 weight GEMMs,
and each trial writes and runs both graphs (``export.int8_weights`` writes one in ~15 s).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.export.int8_weights import quantize_weights, weight_gemms

__all__ = ["VisionLanguageInt8", "choose_kinds", "module_kinds"]

_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of each node
_LAYER_INDEX = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class VisionLanguageInt8:
    language: Path  # the graphs to ship (fp32 where no kind of theirs is in int8)
    vision: Path
    quantized: int  # weight GEMMs in int8
    total: int
    min_cosine: float  # vs the fp32 graphs on the probe items
    fp32_kinds: list[str] = field(default_factory=list)  # kinds left in fp32, most harmful last

    def record(self) -> dict[str, str | float]:
        """What the manifest's ``optimization`` says of it."""
        facts: dict[str, str | float] = {"int8_matmuls": f"{self.quantized}/{self.total}",
                                         "int8_vs_fp32_min_cosine": round(self.min_cosine, 6)}
        if self.fp32_kinds:
            facts["int8_fp32_kinds"] = "; ".join(self.fp32_kinds)
        return facts


def module_kinds(path: Path) -> dict[str, list[str]]:
    """The graph's weight GEMMs (``weight_gemms``) by kind, in graph order: the module each node came from with
    its layer index replaced by ``*``; where the exporter left no record, the weight's name treated the same way."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    kinds: dict[str, list[str]] = {}
    for name in weight_gemms(path):
        node = nodes[name]
        scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
        try:
            module = [s for s in ast.literal_eval(scopes) if s][-2] if scopes else node.input[1]
        except (ValueError, SyntaxError, IndexError):
            module = node.input[1]
        kind = _LAYER_INDEX.sub(".*.", f".{module}.").strip(".")
        kinds.setdefault(kind, []).append(name)
    return kinds


def choose_kinds(language: Path, vision: Path, tmp: Path, *, embed: Callable[[Path, Path], np.ndarray],
                 min_cosine: float, step: Callable[[str], AbstractContextManager] = lambda _title: nullcontext()
                 ) -> VisionLanguageInt8:
    """As many kinds of both graphs in int8 as ``min_cosine`` (vs the fp32 graphs) allows (see the module
    docstring). ``embed(language, vision)``: the probe items' unit vectors through those two graphs; ``step``:
    the export's progress, one step per trial."""
    kinds = {("language", k): v for k, v in module_kinds(language).items()}
    kinds |= {("vision", k): v for k, v in module_kinds(vision).items()}
    total = sum(len(v) for v in kinds.values())
    reference = embed(language, vision)
    trial = [0]

    def measure(chosen: list) -> tuple[float, Path, Path]:
        trial[0] += 1
        graphs = {"language": language, "vision": vision}
        for graph, source in list(graphs.items()):
            nodes = [n for key in chosen if key[0] == graph for n in kinds[key]]
            if nodes:
                graphs[graph] = quantize_weights(source, tmp / f"{graph}-int8-{trial[0]}.onnx", nodes=nodes)
        vectors = embed(graphs["language"], graphs["vision"])
        return float(np.sum(vectors * reference, axis=-1).min()), graphs["language"], graphs["vision"]

    def result(chosen: list, measured: tuple[float, Path, Path]) -> VisionLanguageInt8:
        left = [f"{graph}: {kind}" for graph, kind in kinds if (graph, kind) not in chosen]
        return VisionLanguageInt8(measured[1], measured[2], sum(len(kinds[k]) for k in chosen), total,
                                  measured[0], sorted(left, key=lambda k: order_of.get(k, 0)))

    keys = list(kinds)
    order_of: dict[str, int] = {}
    with step(f"int8: all {total} weight GEMMs ({len(keys)} kinds)"):
        everything = measure(keys)
    if everything[0] >= min_cosine or not keys:
        return result(keys, everything)
    damage = {}
    for k, key in enumerate(keys):
        with step(f"int8: kind {k + 1}/{len(keys)} alone ({key[0]}: {key[1]})"):
            alone = measure([key])
        damage[key] = 1.0 - alone[0]
        _discard(alone, language, vision)
    order = sorted(keys, key=damage.__getitem__)
    order_of.update({f"{g}: {k}": i for i, (g, k) in enumerate(order)})
    best, lo, hi = None, 1, len(order) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        with step(f"int8: the {mid} most harmless of {len(order)} kinds"):
            measured = measure(order[:mid])
        if measured[0] >= min_cosine:
            if best is not None:
                _discard(best[1], language, vision)
            best, lo = (mid, measured), mid + 1
        else:
            _discard(measured, language, vision)
            hi = mid - 1
    if best is None:  # not even the most harmless kind passes: everything in int8, which the gate then refuses
        return result(keys, everything)
    _discard(everything, language, vision)
    return result(order[:best[0]], best[1])


def _discard(measured: tuple[float, Path, Path], *keep: Path) -> None:
    """Delete a trial's int8 graphs and their data (a 2B model's are ~2.5 GB a trial), never the fp32 sources."""
    for graph in measured[1:]:
        if graph not in keep:
            for path in (graph, graph.with_name(graph.name + ".data")):
                path.unlink(missing_ok=True)
