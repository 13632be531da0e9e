"""``export_model``: resolve -> build -> export -> optimize -> verify -> write, with progress."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import msgspec
import numpy as np
import torch

from toolkit.cards import Pooling
from toolkit.errors import ExportError, ParityError
from toolkit.export.graph import build_module, output_names
from toolkit.export.onnx_export import export_graph, read_model_card, tokenizer_json, write_artifact
from toolkit.export.optimize import convert_fp16, fuse_transformer, fused_counts, quantize_int8, time_graph
from toolkit.export.parity import check_parity, retrieval_overlap
from toolkit.export.resolve import ResolvedModel, resolve_model
from toolkit.manifest import Manifest, ParityReport
from toolkit.runtime.tokenization import Tokenizer
from toolkit.settings import ExportOptions, Precision, Target

__all__ = ["ExportResult", "StepReporter", "default_output", "export_model"]

StepReporter = Callable[[str], contextlib.AbstractContextManager]

_INT8_MIN_OVERLAP = 0.95


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


def _special_tokens(tokenizer: Tokenizer, resolved: ResolvedModel) -> tuple[dict[str, str], int]:
    import json

    specials: dict[str, str] = {}
    cfg_path = resolved.transformer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    pad_id = None
    if "pad_token" in specials:
        pad_id = tokenizer._tok.token_to_id(specials["pad_token"])
    if pad_id is None:
        pad_id = resolved.config.get("pad_token_id")
    return specials, int(pad_id or 0)


def _probe_feeds(inputs: tuple[str, ...], vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(5, min(vocab_size, 1000), (8, 64)), "attention_mask": np.ones((8, 64), dtype=np.int64)}
    if "token_type_ids" in inputs:
        feeds["token_type_ids"] = np.zeros((8, 64), dtype=np.int64)
    return {k: v.astype(np.int64) for k, v in feeds.items()}


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
    card = resolved.card
    out = Path(options.output) if options.output else default_output(card.name, options.precision)
    precision, target = Precision(options.precision), Target(options.target)
    if precision == Precision.INT8 and target != Target.CPU:
        raise ExportError("int8 artifacts are for --target cpu; use fp16 for cuda / tensorrt")
    if precision == Precision.FP16 and target == Target.CPU:
        raise ExportError("fp16 artifacts are for --target cuda or tensorrt; the CPU provider runs fp16 slowly")
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="toolkit-export-") as tmp_name:
        tmp = Path(tmp_name)
        with step(f"Loading {resolved.arch.model_type} in PyTorch"):
            module = build_module(resolved, trust_remote_code=options.trust_remote_code)
            tokenizer_text = tokenizer_json(resolved)
            tokenizer = Tokenizer(tokenizer_text, max_length=card.max_seq_len or 512)
            specials, pad_id = _special_tokens(tokenizer, resolved)
        with step("Exporting the graph (torch.onnx, dynamo)"):
            graph = export_graph(module, resolved, opset=options.opset, path=tmp / "graph.onnx")
        optimization: dict[str, str] = {}
        with step(f"Optimizing for {target.value} / {precision.value}"):
            fp32 = graph
            if options.optimize and card.pooling != Pooling.SPLADE:
                fused = fuse_transformer(graph, tmp / "fused.onnx", resolved)
                if fused is not None:
                    feeds = _probe_feeds(resolved.arch.inputs, tokenizer.vocab_size)
                    t_plain, t_fused = time_graph(graph, feeds), time_graph(fused, feeds)
                    optimization = {"fusion": resolved.arch.ort_fusion or "", "plain_ms": f"{t_plain * 1e3:.2f}",
                                    "fused_ms": f"{t_fused * 1e3:.2f}"}
                    # keep the fusion on GPU targets (its kernels are built for them); on CPU only when faster
                    if target != Target.CPU or t_fused < t_plain:
                        fp32 = fused
                    optimization["kept"] = "fused" if fp32 == fused else "plain"
            final = fp32
            if precision == Precision.FP16:
                final = convert_fp16(fp32, tmp / "fp16.onnx")
            elif precision == Precision.INT8:
                final = quantize_int8(fp32, tmp / "int8.onnx")
        embedding_dim = _embedding_dim(module, resolved)
        manifest = Manifest(
            card=card, model_type=resolved.arch.model_type, inputs=list(resolved.arch.inputs),
            outputs=output_names(card), embedding_dim=embedding_dim,
            hidden_size=int(resolved.config.get("hidden_size", 0) or 0), vocab_size=tokenizer.vocab_size,
            max_seq_len=card.max_seq_len or 512, pad_token_id=pad_id, special_tokens=specials,
            precision=precision.value, target=target.value, opset=options.opset,
            export_options={k: str(v) for k, v in msgspec.structs.asdict(options).items() if v not in (None, (), False)},
            versions=_versions(), fused_ops=fused_counts(final), optimization=optimization,
            parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False),
        )
        card_text = read_model_card(resolved)
        candidate = write_artifact(final, tmp / "candidate.onnx", manifest, tokenizer_text, card_text)
        if options.skip_parity:
            warnings.append("PARITY NOT CHECKED (--skip-parity): this artifact is unverified")
            report = manifest.parity
        else:
            with step("Verifying parity against PyTorch"):
                report = check_parity(candidate, resolved, module, precision.value)
                if precision == Precision.INT8:
                    report = _int8_gate(report, candidate, fp32, tmp, manifest, tokenizer_text, card_text)
            if not report.passed:
                if not (options.allow_low_accuracy and precision == Precision.INT8):
                    worst = ", ".join(f"{k}={v:.6f}" for k, v in report.min_cosine.items())
                    extra = "" if report.retrieval_top10_overlap is None else f", top-10 overlap={report.retrieval_top10_overlap:.3f}"
                    raise ParityError(f"parity check failed (min cosine {worst}{extra}; "
                                      f"need >= {report.threshold}); no artifact written", report.min_cosine)
                warnings.append("int8 accuracy gate missed; written anyway (--allow-low-accuracy)")
        quant_range = _quantization_range(candidate) if not manifest.sparse else None
        manifest = msgspec.structs.replace(manifest, parity=report, warnings=warnings, quantization_range=quant_range)
        with step(f"Writing {out.name}"):
            write_artifact(final, out, manifest, tokenizer_text, card_text)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size)


def _embedding_dim(module, resolved: ResolvedModel) -> int:
    if resolved.card.pooling == Pooling.SPLADE:
        return int(resolved.config.get("vocab_size", 0))
    dim = int(resolved.config.get("hidden_size", 0))
    for spec in resolved.dense:
        dim = spec.out_features
    return dim


def _int8_gate(report: ParityReport, candidate: Path, fp32: Path, tmp: Path, manifest: Manifest,
               tokenizer_text: str, card_text: str) -> ParityReport:
    from toolkit.runtime.embedder import Embedder

    reference = write_artifact(fp32, tmp / "fp32-reference.onnx", manifest, tokenizer_text, card_text)
    overlap, min_cos = retrieval_overlap(Embedder(candidate, device="cpu"), Embedder(reference, device="cpu"))
    # int8 gates the sentence-level outputs; token_embeddings are reported, not gated
    sentence_ok = all(v >= report.threshold for k, v in report.min_cosine.items() if k != "token_embeddings")
    passed = sentence_ok and overlap >= _INT8_MIN_OVERLAP and min_cos >= report.threshold
    return msgspec.structs.replace(report, retrieval_top10_overlap=overlap, vs_fp32_min_cosine=min_cos, passed=passed)


def _quantization_range(candidate: Path) -> list[float]:
    """[lo, hi] of unit-vector components on the probe corpus, for Cohere int8 / uint8."""
    from toolkit.corpus import load_corpus
    from toolkit.runtime.embedder import Embedder

    emb = Embedder(candidate, device="cpu")
    vectors = emb.embed(load_corpus(limit=256), truncate_prompt_tokens=-1, normalize=True)
    lo, hi = np.percentile(vectors, [0.5, 99.5])
    return [float(lo), float(hi)]
