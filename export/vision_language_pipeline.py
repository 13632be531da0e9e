"""``toolkit export`` of a vision-language embedder: its language graph as the artifact and its vision graph beside
it (``export.vision_language``), int8 where its gate allows (``export.vision_language_int8``), verified on text,
image and text + image items against transformers (``export.vision_language_parity``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

from toolkit.export.precision import PrecisionPlan
from toolkit.export.resolve import ResolvedModel
from toolkit.export.steps import (
    ExportResult,
    StepReporter,
    draft_manifest,
    pad_token_id,
    parity_error,
    release_memory,
    write_graphs,
)
from toolkit.export.towers import image_tower_path
from toolkit.runtime.tokenization import Tokenizer
from toolkit.settings import ExportOptions

__all__ = ["export_vision_language"]

_INT8_SEARCH_SLACK = 0.95  # the int8 search allows 95% of the gate's 1 - cosine: it measures vs our fp32 graphs,
# the gate vs transformers (which our fp32 graphs match within 1e-5)


def export_vision_language(resolved: ResolvedModel, options: ExportOptions, plan: PrecisionPlan, out: Path,
                           step: StepReporter, started: float) -> ExportResult:
    """The artifact at ``out`` (the language graph) and its vision graph beside it, at ``plan``'s precision (its
    target already checked by ``export_model``); see the module docstring."""
    from toolkit.export.vision_language import (
        export_vision_language_graphs,
        load_vision_language,
        vision_language_spec,
    )
    from toolkit.export.vision_language_parity import parity_references, vision_language_parity
    from toolkit.runtime.embedder import Embedder

    with tempfile.TemporaryDirectory(prefix="toolkit-export-") as tmp_name:
        tmp = Path(tmp_name)
        with step(f"Loading {resolved.arch.model_type} in PyTorch"):
            model = load_vision_language(resolved)
            tokenizer = Tokenizer(resolved.files.tokenizer_json, max_length=resolved.card.max_seq_len or 512)
            pad_id = pad_token_id(tokenizer, resolved)
            spec = vision_language_spec(resolved, tokenizer)
        with step("Exporting the vision and language graphs (torch.onnx, dynamo)"):
            language, vision = export_vision_language_graphs(model, resolved, spec, opset=options.opset, tmp=tmp)
        optimization: dict[str, float | int | str] = {}
        draft = vision_language_manifest(draft_manifest(resolved, options, language, tokenizer, pad_id, {}), spec)
        references = None
        colvision = resolved.config.get("colvision")  # its kind (export.colvision.read_colvision), None otherwise
        if not options.skip_parity:
            with step("Computing transformers' embeddings of the probe items (the parity reference)"):
                if colvision:
                    from toolkit.export.colvision_parity import colvision_references

                    references = colvision_references(model, resolved.model_dir, colvision)
                else:
                    references = parity_references(draft, resolved, model)
        del model  # not needed past this point (a 2B model: 8.8 GB), before any graph is rewritten or opened
        release_memory()
        if plan.quantizes_int8:  # the kinds of layer int8 leaves within its gate (vs our fp32 graphs); then the parity check below
            from toolkit.cpu import describe
            from toolkit.export.vision_language_int8 import choose_kinds
            from toolkit.export.vision_language_parity import THRESHOLDS, probe_vectors

            def embed(lang: Path, vis: Path) -> np.ndarray:
                trial = write_graphs(lang, vis, tmp / "trial.onnx", draft, resolved, self_contained=False)
                vectors = probe_vectors(Embedder(trial, device="cpu"))
                release_memory()  # the trial's sessions (a 2B model's fp32 graphs: 8.8 GB) before the next
                return vectors

            choice = choose_kinds(language, vision, tmp, embed=embed, step=step,
                                  min_cosine=1 - _INT8_SEARCH_SLACK * (1 - THRESHOLDS["int8"]))
            language, vision = choice.language, choice.vision
            optimization = {**choice.record(), "int8_gated_on": describe()}
        elif plan.converts_fp16:  # fp16 weights and compute, fp32 inputs and outputs
            from toolkit.export.optimize import convert_fp16

            with step("Converting both graphs to fp16 (inputs and outputs stay fp32)"):
                language = convert_fp16(language, tmp / "graph-fp16.onnx")
                vision = convert_fp16(vision, tmp / "image-fp16.onnx")
            release_memory()
        manifest = vision_language_manifest(draft_manifest(resolved, options, language, tokenizer, pad_id,
                                                           optimization), spec)
        candidate = write_graphs(language, vision, tmp / "candidate.onnx", manifest, resolved, self_contained=False)
        report, warnings = manifest.parity, []
        if references is None:
            warnings.append("PARITY NOT CHECKED (--skip-parity): this artifact is unverified")
        else:
            with step("Verifying parity against transformers (text, image and text + image items)"):
                candidate_embedder = Embedder(candidate, device=plan.parity_device)
                if colvision:
                    from toolkit.export.colvision_parity import colvision_parity

                    report = colvision_parity(candidate_embedder, references, plan.name, colvision)
                else:
                    report = vision_language_parity(candidate_embedder, references, plan.name)
            if not report.passed:
                if not plan.allows_low_accuracy(options):
                    raise parity_error(report)
                warnings.append("int8 accuracy gate missed; written anyway (--allow-low-accuracy)")
        manifest = msgspec.structs.replace(manifest, parity=report, warnings=warnings,
                                           vision_language=msgspec.structs.replace(spec, parity=report))
        with step(f"Writing {out.name} and {image_tower_path(out).name}"):
            write_graphs(language, vision, out, manifest, resolved)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size)


def vision_language_manifest(manifest, spec):
    """``manifest`` with the vision-language facts: ``spec``, the language model's width, and the head's encoders
    declaring videos too where the family reads them (Qwen3-VL)."""
    head = manifest.head_spec
    if spec.video is not None:
        head = msgspec.structs.replace(head, encoders={**head.encoders, "video": "vision_language"})
    return msgspec.structs.replace(manifest, vision_language=spec, hidden_size=spec.hidden_size, head=head)
