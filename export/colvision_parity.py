"""ColVision retrievers (``export.colvision``) verified against transformers: per-token vectors of probe queries and
of document pages of awkward kinds, batched and alone, and MaxSim, against ``ColQwen2ForRetrieval`` /
``ColPaliForRetrieval`` fed by their processors and ``score_retrieval``. Apart from ``export.colvision`` so that
reading a checkpoint (``export.resolve``) does not import the export's graph modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.export.colvision import COLVISION_TYPES
from toolkit.manifest import ParityCase, ParityReport

__all__ = ["THRESHOLDS", "colvision_parity", "colvision_references", "probe_inputs"]

THRESHOLDS = {"fp32": 1e-5, "fp16": 5e-3}  # max absolute difference of unit-vector components and MaxSim / query token


def probe_inputs() -> tuple[list[str], list[bytes]]:
    """Queries (short, long, punctuated) and document images of awkward kinds and mixed sizes."""
    from toolkit.export.towers import probe_images

    images = probe_images()
    queries = ["What is ONNX Runtime?", "quarterly revenue chart for 2024, by region and product line",
               "cats, dogs & birds: which sleeps most?"]
    return queries, [images[name] for name in ("wide.png", "tall.png", "photo.jpg", "rgba.png")]


def reference_vectors(model: torch.nn.Module, processor, queries: list[str], images: list) -> tuple[list, list]:
    """The model's per-token vectors of ``queries`` and ``images`` (PIL), batched as the processor pads them: each
    item's rows where its attention mask is 1."""
    def rows(batch) -> list[np.ndarray]:
        with torch.no_grad():
            out = model(**batch).embeddings.numpy()
        mask = batch["attention_mask"].numpy().astype(bool)
        return [out[i][mask[i]] for i in range(len(out))]

    return rows(processor.process_queries(queries)), rows(processor.process_images(images))


def colvision_references(model: torch.nn.Module, model_dir: Path, kind: str) -> tuple[list, list, np.ndarray]:
    """The reference for ``colvision_parity``: ``ColQwen2ForRetrieval``'s per-token vectors of the probe queries
    and images through ``ColQwen2Processor``, and their MaxSim (``score_retrieval``); computed before the export
    lets the model go."""
    import io

    import transformers
    from PIL import Image

    processor = getattr(transformers, COLVISION_TYPES[kind][2]).from_pretrained(model_dir)
    queries, encoded = probe_inputs()
    images = [Image.open(io.BytesIO(b)) for b in encoded]  # the processor converts (RGBA on white)
    ref_q, ref_d = reference_vectors(model, processor, queries, images)
    ref_s = processor.score_retrieval([torch.from_numpy(m) for m in ref_q], [torch.from_numpy(m) for m in ref_d])
    return ref_q, ref_d, ref_s.numpy()


def colvision_parity(emb, references: tuple[list, list, np.ndarray], precision: str, kind: str) -> ParityReport:
    """``emb.embed_multi`` of the probe queries and images (all at once and one at a time) and ``emb.max_sim``
    against ``colvision_references``: the largest absolute difference of each (MaxSim's per query token)."""
    ref_q, ref_d, ref_s = references
    queries, encoded = probe_inputs()
    cases, largest = [], {}
    batched_q, batched_d = emb.embed_multi(queries, is_query=True), emb.embed_multi(encoded)
    for label, got_q, got_d in (
            ("batched", batched_q, batched_d),
            ("alone", [m for q in queries for m in emb.embed_multi([q], is_query=True)],
             [m for d in encoded for m in emb.embed_multi([d])])):
        for name, got, ref in (("query vectors", got_q, ref_q), ("document image vectors", got_d, ref_d)):
            diff = _diff(got, ref)
            largest[name] = max(largest.get(name, 0.0), diff)
            cases.append(ParityCase(output=f"{name} ({label})", batch=len(got), seq_len=max(len(m) for m in got),
                                    padded=label == "batched", padding_side=emb.padding.value, min_cosine=-1.0,
                                    max_abs_diff=diff))
    # MaxSim sums one cosine per query token: its error grows with the query's length
    per_token = float(np.abs(emb.max_sim(batched_q, batched_d) - ref_s).max()) / max(len(m) for m in ref_q)
    largest["MaxSim per query token (score_retrieval)"] = per_token
    cases.append(ParityCase(output="MaxSim per query token (score_retrieval)", batch=len(ref_q) * len(ref_d),
                            seq_len=0, padded=True, padding_side=emb.padding.value, min_cosine=-1.0,
                            max_abs_diff=per_token))
    threshold = THRESHOLDS.get(precision, 5e-3)
    _, model_class, processor_class = COLVISION_TYPES[kind]
    return ParityReport(reference=f"transformers {model_class} + {processor_class}", threshold=threshold,
                        max_abs_diff=largest, cases=cases, passed=max(largest.values()) <= threshold)


def _diff(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    if [g.shape for g in got] != [r.shape for r in ref]:
        return float("inf")
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
