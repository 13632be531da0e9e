"""The export's shared steps: its result, progress, the artifact's draft manifest, writing graphs, errors."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import msgspec
import torch

from toolkit.errors import ParityError
from toolkit.export.graph import output_names
from toolkit.export.onnx_export import write_artifact
from toolkit.export.optimize import fused_counts
from toolkit.export.parity import NOISE_FACTOR
from toolkit.export.precision import PrecisionPlan
from toolkit.export.resolve import ResolvedModel
from toolkit.export.towers import image_tower_path
from toolkit.manifest import Manifest, ParityReport
from toolkit.runtime.tokenization import Tokenizer
from toolkit.settings import ExportOptions, Precision, Target

__all__ = ["ExportResult", "StepReporter", "default_output", "draft_manifest", "graph_opset", "option_values",
           "pad_token_id", "parity_error", "quiet_step", "release_memory", "write_graphs"]

StepReporter = Callable[[str], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    seconds: float
    size_bytes: int


@contextlib.contextmanager
def quiet_step(title: str) -> Iterator[None]:
    yield


def default_output(card_name: str, plan: PrecisionPlan) -> Path:
    """Where an export writes when no output is given: the card's name and the precision's suffix, here."""
    return Path.cwd() / f"{card_name.replace('/', '_')}{plan.file_suffix}.onnx"


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("onnx-embed-toolkit", "torch", "transformers", "onnxruntime-gpu", "onnxruntime", "onnx",
                 "sentence-transformers", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def pad_token_id(tokenizer: Tokenizer, resolved: ResolvedModel) -> int:
    """The padding id: the tokenizer's pad token, else config.json's pad_token_id, else 0."""
    pad = resolved.files.special_tokens.get("pad_token")
    pad_id = tokenizer.token_id(pad) if pad is not None else None
    if pad_id is None:
        pad_id = resolved.config.get("pad_token_id")
    return int(pad_id or 0)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise: measured ~1 GiB retained
    after the parity step of a 2 GB model), so the write's copy of the weights lands on a smaller peak."""
    torch._dynamo.reset()  # torch.export's caches hold the traced module's parameters
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_graphs(graph: Path, image_graph: Path | None, out: Path, manifest: Manifest, resolved: ResolvedModel, *,
                 self_contained: bool = True) -> Path:
    """The artifact at ``out``; a two-tower model's image tower first, beside it (``name.image.onnx``), each
    file carrying the manifest, the tokenizer and the model card (``self_contained``: see ``write_artifact``)."""
    files = (resolved.files.tokenizer_json, resolved.files.model_card)
    if image_graph is not None:
        write_artifact(image_graph, image_tower_path(out), msgspec.structs.replace(manifest, tower="image"), *files,
                       self_contained=self_contained)
    return write_artifact(graph, out, manifest, *files, self_contained=self_contained)


def draft_manifest(resolved: ResolvedModel, options: ExportOptions, final: Path, tokenizer: Tokenizer, pad_id: int,
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
        target=Target(options.target).value, opset=graph_opset(final), export_options=option_values(options),
        versions=package_versions(), fused_ops=fused_counts(final), optimization=optimization,
        parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False), head=resolved.head.spec(),
    )


def parity_error(report: ParityReport) -> ParityError:
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


def option_values(options: ExportOptions) -> dict:
    """The options that differ from off / unset, as JSON values of their own types (enums as their values)."""
    values = msgspec.to_builtins(options, enc_hook=str)
    values.pop("adapters", None)  # the manifest lists them (``Manifest.adapters``)
    return {k: v for k, v in values.items() if v not in (None, [], False)}


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
