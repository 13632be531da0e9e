"""``export_model``: resolve -> build -> export -> optimize -> verify -> write, with progress."""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import msgspec
import numpy as np
import torch

from toolkit.errors import ExportError, ParityError
from toolkit.export.graph import build_module, output_names
from toolkit.export.onnx_export import export_graph, write_artifact
from toolkit.export.optimize import (
    compact_embedding_table,
    convert_fp16,
    fuse_transformer,
    fused_counts,
    time_graphs,
)
from toolkit.export.parity import NOISE_FACTOR, check_parity
from toolkit.export.resolve import ResolvedModel, resolve_model
from toolkit.export.towers import (
    build_image_tower,
    check_image_tower,
    image_tower_path,
    quantize_image_tower,
)
from toolkit.manifest import Manifest, ParityReport
from toolkit.runtime.tokenization import Tokenizer
from toolkit.settings import ExportOptions, Precision, Target

__all__ = ["ExportResult", "StepReporter", "default_output", "export_model"]

StepReporter = Callable[[str], contextlib.AbstractContextManager]



@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    seconds: float
    size_bytes: int


@contextlib.contextmanager
def _quiet_step(title: str) -> Iterator[None]:
    yield


def default_output(card_name: str, precision: Precision) -> Path:
    suffix = "" if precision == Precision.FP32 else f"-{precision.value}"
    return Path.cwd() / f"{card_name.replace('/', '_')}{suffix}.onnx"


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("onnx-embed-toolkit", "torch", "transformers", "onnxruntime-gpu", "onnxruntime", "onnx",
                 "sentence-transformers", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _pad_id(tokenizer: Tokenizer, resolved: ResolvedModel) -> int:
    """The padding id: the tokenizer's pad token, else config.json's pad_token_id, else 0."""
    pad = resolved.files.special_tokens.get("pad_token")
    pad_id = tokenizer.token_id(pad) if pad is not None else None
    if pad_id is None:
        pad_id = resolved.config.get("pad_token_id")
    return int(pad_id or 0)


def _probes(inputs: tuple[str, ...], vocab_size: int) -> list[dict[str, np.ndarray]]:
    """What graph timing runs: one short sentence (latency) and a batch of 8 x 64 (throughput)."""
    rng = np.random.default_rng(0)
    probes = []
    for batch, seq in ((1, 24), (8, 64)):
        feeds = {"input_ids": rng.integers(5, min(vocab_size, 1000), (batch, seq)).astype(np.int64),
                 "attention_mask": np.ones((batch, seq), dtype=np.int64)}
        if "token_type_ids" in inputs:
            feeds["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
        probes.append(feeds)
    return probes


def _graph_forms(module, resolved: ResolvedModel, graph: Path, tmp: Path, opset: int, *, compact: bool) -> dict[str, Path]:
    """The candidate graph forms: the dynamo graph, and where a fuser applies, both exporters' graphs fused."""
    forms = {"dynamo": graph}
    if resolved.arch.ort_fusion is None:
        return forms
    # without EmbedLayerNormalization the lookup stays a Gather, whose table can be stored in fp16
    embed_ln = not compact
    forms["dynamo+fused"] = fuse_transformer(graph, tmp / "dynamo-fused.onnx", resolved, embed_layer_norm=embed_ln)
    try:
        # opset 17: at 18 onnxruntime's symbolic shape inference fails on this graph and nothing fuses (measured)
        legacy = export_graph(module, resolved, opset=min(opset, 17), path=tmp / "legacy.onnx", exporter="legacy")
        forms["legacy+fused"] = fuse_transformer(legacy, tmp / "legacy-fused.onnx", resolved, embed_layer_norm=embed_ln)
    except ExportError:
        pass  # the TorchScript exporter cannot trace every model; the dynamo forms remain
    return forms


def export_model(model: str | None, options: ExportOptions | None = None, *, step: StepReporter = _quiet_step) -> ExportResult:
    """Export ``model`` (Hub id, directory, card name; None = the bundled default) to one artifact.

    Raises ConfigError for bad input, ExportError / ParityError when the
    artifact cannot be made or does not match the reference (nothing is written).
    """
    options = options or ExportOptions()
    started = time.perf_counter()
    torch.manual_seed(0)
    with step("Resolving the model card"):
        resolved = resolve_model(model, options)
    precision, target = _check_precision(resolved, options)
    out = Path(options.output) if options.output else default_output(resolved.card.name, precision)
    if resolved.head.vision_language:
        return _export_vision_language(resolved, options, out, step, started)
    with tempfile.TemporaryDirectory(prefix="toolkit-export-") as tmp_name:
        tmp = Path(tmp_name)
        with step(f"Loading {resolved.arch.model_type} in PyTorch"):
            module = build_module(resolved, trust_remote_code=options.trust_remote_code)
            tokenizer = Tokenizer(resolved.files.tokenizer_json, max_length=resolved.card.max_seq_len or 512)
            pad_id = _pad_id(tokenizer, resolved)
        with step("Exporting the graph (torch.onnx, dynamo)"):
            graph = export_graph(module, resolved, opset=options.opset, path=tmp / "graph.onnx")
        with step(f"Optimizing for {target.value} / {precision.value}"):
            fp32, final, optimization = _optimize(module, resolved, graph, tmp, options, tokenizer)
        choice = None
        if precision == Precision.INT8 and not resolved.head.image_tower:  # two towers: the image tower's, below
            with step("Choosing the MatMuls that run in int8 (accuracy-guided, a few minutes)"):
                from toolkit.export.int8 import choose_for_model

                choice = choose_for_model(fp32, tmp, resolved, tokenizer, pad_id)
            final = choice.path
            optimization["int8_matmuls"] = f"{len(choice.quantized)}/{choice.total}"
            if choice.smoothing is not None:
                optimization["int8_smoothing"] = choice.smoothing
            from toolkit.cpu import describe

            optimization["int8_gated_on"] = describe()  # the kernels differ by CPU: the gate ran on these
        image_graph = None
        if resolved.head.image_tower:
            with step("Exporting the image tower (torch.onnx, dynamo)"):
                image_graph, tower = build_image_tower(module, resolved, options, tmp)
            if precision == Precision.INT8:  # the GEMM-bound ViT; the text tower (a few ms a query) stays fp32
                image_graph, optimization = quantize_image_tower(image_graph, tmp, optimization)
        manifest = _manifest(resolved, options, final, tokenizer, pad_id, optimization)
        if image_graph is not None:
            manifest = msgspec.structs.replace(manifest, image=tower)
        candidate = _write(final, image_graph, tmp / "candidate.onnx", manifest, resolved, self_contained=False)
        report, warnings = manifest.parity, []
        if resolved.arch.converted:
            warnings.append(f"converted: '{resolved.arch.model_type}' is not in the registry; exported as a "
                            f"{'bidirectional' if resolved.card.bidirectional else 'causal'} decoder with "
                            f"{resolved.card.pooling.value} pooling, {resolved.card.padding_side.value} padding"
                            f"{', normalized' if resolved.card.normalize else ''} (as vLLM's --convert embed)")
        if options.skip_parity:
            warnings.append("PARITY NOT CHECKED (--skip-parity): this artifact is unverified")
        else:
            with step("Verifying parity against PyTorch"):
                text_precision = "fp32" if resolved.head.image_tower else precision.value  # that graph's own
                report = check_parity(candidate, resolved, module, text_precision)
                if choice is not None:
                    from toolkit.export.int8 import int8_gate

                    report = int8_gate(report, choice)
                if image_graph is not None:
                    manifest = check_image_tower(manifest, candidate, resolved, module, precision)
            if not report.passed:
                if not (options.allow_low_accuracy and precision == Precision.INT8):
                    raise _parity_error(report)
                warnings.append("int8 accuracy gate missed; written anyway (--allow-low-accuracy)")
        quant_range = _quantization_range(candidate) if resolved.head.calibrated_range else None
        manifest = msgspec.structs.replace(manifest, parity=report, warnings=warnings, quantization_range=quant_range)
        del module  # the reference's weights are not needed past this point: the write holds its own copy
        _release_memory()
        with step(f"Writing {out.name}" + (f" and {image_tower_path(out).name}" if image_graph else "")):
            _write(final, image_graph, out, manifest, resolved)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size)


def _export_vision_language(resolved: ResolvedModel, options: ExportOptions, out: Path, step: StepReporter,
                            started: float) -> ExportResult:
    """A vision-language embedder: its language graph as the artifact and its vision graph beside it
    (``export.vision_language``), verified on text, image and text + image items against transformers."""
    from toolkit.export.vision_language import (
        export_vision_language_graphs,
        load_vision_language,
        vision_language_spec,
    )
    from toolkit.export.vision_language_parity import vision_language_parity
    from toolkit.runtime.embedder import Embedder

    with tempfile.TemporaryDirectory(prefix="toolkit-export-") as tmp_name:
        tmp = Path(tmp_name)
        with step(f"Loading {resolved.arch.model_type} in PyTorch"):
            model = load_vision_language(resolved)
            tokenizer = Tokenizer(resolved.files.tokenizer_json, max_length=resolved.card.max_seq_len or 512)
            pad_id = _pad_id(tokenizer, resolved)
            spec = vision_language_spec(resolved, tokenizer)
        with step("Exporting the vision and language graphs (torch.onnx, dynamo)"):
            language, vision = export_vision_language_graphs(model, resolved, spec, opset=options.opset, tmp=tmp)
        optimization: dict[str, float | int | str] = {}
        int8 = Precision(options.precision) == Precision.INT8
        if int8:  # every MatMul of both graphs; the gate below is the parity check at int8's threshold
            from toolkit.cpu import describe
            from toolkit.export.optimize import quantizable_matmuls, quantize_int8

            del model  # the quantizer holds each graph twice: PyTorch's copy is reloaded for the parity check after
            _release_memory()  # (measured: a 2B model's int8 export was killed at 24 GiB with it still held)
            with step("Quantizing both graphs' MatMuls to int8 (dynamic, per-channel weights)"):
                counts = len(quantizable_matmuls(language)) + len(quantizable_matmuls(vision))
                language = quantize_int8(language, tmp / "graph-int8.onnx", plain=True)
                vision = quantize_int8(vision, tmp / "image-int8.onnx", plain=True)
            with step(f"Reloading {resolved.arch.model_type} in PyTorch (the parity reference)"):
                model = load_vision_language(resolved)
            optimization = {"int8_matmuls": f"{counts}/{counts}", "int8_gated_on": describe()}
        manifest = msgspec.structs.replace(_manifest(resolved, options, language, tokenizer, pad_id, optimization),
                                           vision_language=spec, hidden_size=spec.hidden_size)
        candidate = _write(language, vision, tmp / "candidate.onnx", manifest, resolved, self_contained=False)
        report, warnings = manifest.parity, []
        if options.skip_parity:
            warnings.append("PARITY NOT CHECKED (--skip-parity): this artifact is unverified")
        else:
            with step("Verifying parity against transformers (text, image and text + image items)"):
                report = vision_language_parity(Embedder(candidate, device="cpu"), resolved, model,
                                                Precision(options.precision).value)
            if not report.passed:
                if not (int8 and options.allow_low_accuracy):
                    raise _parity_error(report)
                warnings.append("int8 accuracy gate missed; written anyway (--allow-low-accuracy)")
        manifest = msgspec.structs.replace(manifest, parity=report, warnings=warnings,
                                           vision_language=msgspec.structs.replace(spec, parity=report))
        del model
        _release_memory()
        with step(f"Writing {out.name} and {image_tower_path(out).name}"):
            _write(language, vision, out, manifest, resolved)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size)


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise: measured ~1 GiB retained
    after the parity step of a 2 GB model), so the write's copy of the weights lands on a smaller peak."""
    torch._dynamo.reset()  # torch.export's caches hold the traced module's parameters
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _write(graph: Path, image_graph: Path | None, out: Path, manifest: Manifest, resolved: ResolvedModel, *,
           self_contained: bool = True) -> Path:
    """The artifact at ``out``; a two-tower model's image tower first, beside it (``name.image.onnx``), each
    file carrying the manifest, the tokenizer and the model card (``self_contained``: see ``write_artifact``)."""
    files = (resolved.files.tokenizer_json, resolved.files.model_card)
    if image_graph is not None:
        write_artifact(image_graph, image_tower_path(out), msgspec.structs.replace(manifest, tower="image"), *files,
                       self_contained=self_contained)
    return write_artifact(graph, out, manifest, *files, self_contained=self_contained)


def _check_precision(resolved: ResolvedModel, options: ExportOptions) -> tuple[Precision, Target]:
    """The precision / target pair, refused where it does not fit (int8 is CPU, fp16 GPU; no int8 cross-encoders)."""
    precision, target = Precision(options.precision), Target(options.target)
    if precision == Precision.INT8 and target != Target.CPU:
        raise ExportError("int8 artifacts are for --target cpu; use fp16 for cuda / tensorrt")
    if precision == Precision.INT8 and resolved.head.pairs:
        raise ExportError("int8 is not offered for cross-encoders yet: export fp32 (or fp16 for cuda)")
    if precision == Precision.FP16 and resolved.head.vision_language:
        raise ExportError("vision-language models export in fp32 or int8 for now (fp16 is not offered yet)")
    if precision == Precision.FP16 and target == Target.CPU:
        raise ExportError("fp16 artifacts are for --target cuda or tensorrt; the CPU provider runs fp16 slowly")
    return precision, target


def _optimize(module, resolved: ResolvedModel, graph: Path, tmp: Path, options: ExportOptions,
              tokenizer: Tokenizer) -> tuple[Path, Path, dict[str, float | int | str]]:
    """(the fp32 graph to ship or quantize, the final graph, what was chosen and measured).

    Where the head allows the fusions, the graph forms are timed against each other on CPU (the fastest is
    kept) or the fused form is taken for GPU targets; on CPU the word-embedding table goes to fp16 where the
    head allows it; fp16 targets convert last.
    """
    target = Target(options.target)
    optimization: dict[str, float | int | str] = {}
    compact = target == Target.CPU and options.fp16_embedding_table and resolved.head.compact_table
    fp32 = graph
    if options.optimize and resolved.head.optimizable:
        forms = _graph_forms(module, resolved, graph, tmp, options.opset, compact=compact)
        if len(forms) > 1:
            if target == Target.CPU:  # keep whichever form measures fastest here
                timings = time_graphs(forms, _probes(resolved.arch.inputs, tokenizer.vocab_size))
                kept = min(timings, key=timings.__getitem__)
                optimization = {f"{name}_ms": round(t * 1e3, 2) for name, t in timings.items()}
            else:  # GPU targets: the fused attention kernels are built for them
                kept = "legacy+fused" if "legacy+fused" in forms else "dynamo+fused"
            optimization["kept"] = kept
            fp32 = forms[kept]
    if compact:
        compacted = compact_embedding_table(fp32, tmp / "compact.onnx")
        if compacted is not None:
            fp32 = compacted
            optimization["embedding_table"] = "fp16"
    final = convert_fp16(fp32, tmp / "fp16.onnx") if Precision(options.precision) == Precision.FP16 else fp32
    return fp32, final, optimization


def _manifest(resolved: ResolvedModel, options: ExportOptions, final: Path, tokenizer: Tokenizer, pad_id: int,
              optimization: dict) -> Manifest:
    """The artifact's manifest before verification (its parity report is filled in after)."""
    card = resolved.card
    return Manifest(
        card=card, model_type=resolved.arch.model_type, inputs=list(resolved.arch.inputs),
        outputs=output_names(resolved),
        embedding_dim=resolved.head.dim(resolved.config, resolved.dense[-1].out_features if resolved.dense else None),
        hidden_size=int(resolved.config.get("hidden_size", 0) or 0), vocab_size=tokenizer.vocab_size,
        max_seq_len=card.max_seq_len or 512, pad_token_id=pad_id, special_tokens=resolved.files.special_tokens,
        chat_template=resolved.files.chat_template, precision=Precision(options.precision).value,
        target=Target(options.target).value, opset=_graph_opset(final), export_options=_option_values(options),
        versions=_versions(), fused_ops=fused_counts(final), optimization=optimization,
        parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False), head=resolved.head.spec(),
    )


def _parity_error(report: ParityReport) -> ParityError:
    """What a failed verification says: the figures that missed, and by how much."""
    if report.max_abs_diff and not report.min_cosine:  # scores (cross-encoders)
        worst = ", ".join(f"{k}={v:.2e}" for k, v in report.max_abs_diff.items())
        return ParityError(f"parity check failed (max abs difference {worst}; need <= {report.threshold}); "
                           "no artifact written", report.max_abs_diff)
    worst = ", ".join(f"{k}={v:.6f}" for k, v in report.min_cosine.items())
    extra = "" if report.retrieval_top10_overlap is None else f", top-10 overlap={report.retrieval_top10_overlap:.3f}"
    extra += "".join(f"; {k}: {a:.2e} from float64 vs torch fp32's {t:.2e} (allowed x{NOISE_FACTOR:g})"
                     for k, (a, t) in report.noise_floor.items())
    return ParityError(f"parity check failed (min cosine {worst}{extra}; need >= {report.threshold}); "
                       "no artifact written", report.min_cosine)


def _option_values(options: ExportOptions) -> dict:
    """The options that differ from off / unset, as JSON values of their own types (enums as their values)."""
    values = msgspec.to_builtins(options, enc_hook=str)
    return {k: v for k, v in values.items() if v not in (None, [], False)}


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantization_range(candidate: Path) -> list[float]:
    """[lo, hi] of unit-vector components on the probe corpus, for Cohere int8 / uint8."""
    from toolkit.corpus import load_corpus
    from toolkit.runtime.embedder import Embedder

    emb = Embedder(candidate, device="cpu")
    vectors = emb.embed(load_corpus(limit=256), truncate_prompt_tokens=-1, normalize=True)
    lo, hi = np.percentile(vectors, [0.5, 99.5])
    return [float(lo), float(hi)]
