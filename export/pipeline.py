"""``export_model``: resolve -> build -> export -> optimize -> verify -> write, with progress."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

from toolkit.errors import ExportError
from toolkit.export.adapters import AdapterExport
from toolkit.export.graph import build_module
from toolkit.export.onnx_export import export_graph
from toolkit.export.optimize import (
    compact_embedding_table,
    convert_fp16,
    fuse_transformer,
    time_graphs,
)
from toolkit.export.parity import check_parity
from toolkit.export.precision import PrecisionPlan
from toolkit.export.resolve import ResolvedModel, resolve_model
from toolkit.export.steps import (
    ExportResult,
    StepReporter,
    default_output,
    draft_manifest,
    pad_token_id,
    parity_error,
    quiet_step,
    release_memory,
    write_graphs,
)
from toolkit.export.towers import (
    build_image_tower,
    check_image_tower,
    image_tower_path,
    quantize_image_tower,
)
from toolkit.runtime.tokenization import Tokenizer
from toolkit.settings import ExportOptions, Target

__all__ = ["ExportResult", "StepReporter", "default_output", "export_model"]


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


def export_model(model: str | None, options: ExportOptions | None = None, *, step: StepReporter = quiet_step) -> ExportResult:
    """Export ``model`` (Hub id, directory, card name; None = the bundled default) to one artifact.

    Raises ConfigError for bad input, ExportError / ParityError when the
    artifact cannot be made or does not match the reference (nothing is written).
    """
    options = options or ExportOptions()
    started = time.perf_counter()
    torch.manual_seed(0)
    with step("Resolving the model card"):
        resolved = resolve_model(model, options)
    plan = PrecisionPlan.for_export(options, pairs=resolved.head.pairs, multi_vector=resolved.head.multi_vector,
                                    towers=resolved.head.image_tower or resolved.head.vision_language)
    target = Target(options.target)
    out = Path(options.output) if options.output else default_output(resolved.card.name, plan)
    adapter_folders = AdapterExport.check(resolved, plan, options) if options.adapters or resolved.adapters else []
    if resolved.head.vision_language:
        from toolkit.export.vision_language_pipeline import export_vision_language

        return export_vision_language(resolved, options, plan, out, step, started)
    with tempfile.TemporaryDirectory(prefix="toolkit-export-") as tmp_name:
        tmp = Path(tmp_name)
        with step(f"Loading {resolved.arch.model_type} in PyTorch"):
            module = build_module(resolved, trust_remote_code=options.trust_remote_code)
            tokenizer = Tokenizer(resolved.files.tokenizer_json, max_length=resolved.card.max_seq_len or 512)
            pad_id = pad_token_id(tokenizer, resolved)
        adapters = None
        if adapter_folders:
            with step(f"Reading {len(adapter_folders)} LoRA adapter(s) with PEFT (the reference: a second copy)"):
                adapters = AdapterExport.prepare(module, build_module(resolved, trust_remote_code=options.trust_remote_code),
                                                 adapter_folders)
        with step("Exporting the graph (torch.onnx, dynamo)"):
            graph = export_graph(module, resolved, opset=options.opset, path=tmp / "graph.onnx")
        with step(f"Optimizing for {target.value} / {plan.name}"):
            fp32, final, optimization = _optimize(module, resolved, graph, tmp, options, plan, tokenizer)
            if adapters is not None:  # the slots as overridable inputs; the module is the base model again
                final = adapters.expose(final, tmp)
        choice = None
        if plan.quantizes_int8 and not resolved.head.image_tower:  # two towers: the image tower's, below
            with step("Choosing the MatMuls that run in int8 (accuracy-guided, a few minutes)"):
                from toolkit.export.int8 import choose_for_model

                choice = choose_for_model(fp32, tmp, resolved, tokenizer, pad_id, form=options.int8_form)
            final = choice.path
            optimization["int8_matmuls"] = f"{len(choice.quantized)}/{choice.total}"
            optimization["int8_form"] = choice.form
            optimization["int8_forms"] = choice.forms  # each form searched: MatMuls, gate measures, time
            if choice.smoothing is not None:
                optimization["int8_smoothing"] = choice.smoothing
            from toolkit.cpu import describe

            optimization["int8_gated_on"] = describe()  # the kernels differ by CPU: the gate ran on these
        image_graph = None
        if resolved.head.image_tower:
            with step("Exporting the image tower (torch.onnx, dynamo)"):
                image_graph, tower = build_image_tower(module, resolved, options, plan, tmp)
            if plan.quantizes_int8:  # the GEMM-bound ViT; the text tower (a few ms a query) stays fp32
                image_graph, optimization = quantize_image_tower(image_graph, tmp, optimization)
        manifest = draft_manifest(resolved, options, final, tokenizer, pad_id, optimization)
        if image_graph is not None:
            manifest = msgspec.structs.replace(manifest, image=tower)
        if adapters is not None:
            manifest = msgspec.structs.replace(manifest, adapters=adapters.specs())
        candidate = write_graphs(final, image_graph, tmp / "candidate.onnx", manifest, resolved, self_contained=False)
        if adapters is not None:
            adapters.write_files(candidate)
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
                text_precision = "fp32" if resolved.head.image_tower else plan.name  # that graph's own
                report = check_parity(candidate, resolved, module, text_precision)
                if choice is not None:
                    from toolkit.export.int8 import int8_gate

                    report = int8_gate(report, choice)
                if image_graph is not None:
                    manifest = check_image_tower(manifest, candidate, resolved, module, plan)
            if adapters is not None and report.passed:
                with step(f"Verifying {len(manifest.adapters)} adapter(s) against PEFT's model"):
                    manifest = msgspec.structs.replace(
                        manifest, adapters=adapters.verify(candidate, resolved, text_precision, manifest.adapters))
            if not report.passed:
                if not plan.allows_low_accuracy(options):
                    raise parity_error(report)
                warnings.append("int8 accuracy gate missed; written anyway (--allow-low-accuracy)")
        quant_range = _quantization_range(candidate) if resolved.head.calibrated_range else None
        manifest = msgspec.structs.replace(manifest, parity=report, warnings=warnings, quantization_range=quant_range)
        del module  # the reference's weights are not needed past this point: the write holds its own copy
        if adapters is not None:
            adapters.release()
        release_memory()
        with step(f"Writing {out.name}" + (f" and {image_tower_path(out).name}" if image_graph else "")):
            if adapters is not None:
                adapters.write_files(out)
            write_graphs(final, image_graph, out, manifest, resolved)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size)


def _optimize(module, resolved: ResolvedModel, graph: Path, tmp: Path, options: ExportOptions, plan: PrecisionPlan,
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
    final = convert_fp16(fp32, tmp / "fp16.onnx") if plan.converts_fp16 else fp32
    return fp32, final, optimization


def _quantization_range(candidate: Path) -> list[float]:
    """[lo, hi] of unit-vector components on the probe corpus, for Cohere int8 / uint8."""
    from toolkit.corpus import load_corpus
    from toolkit.runtime.embedder import Embedder

    emb = Embedder(candidate, device="cpu")
    vectors = emb.embed(load_corpus(limit=256), truncate_prompt_tokens=-1, normalize=True)
    lo, hi = np.percentile(vectors, [0.5, 99.5])
    return [float(lo), float(hi)]
