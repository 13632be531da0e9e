"""Which graph output answers an embedding request, and what numpy does after it (Matryoshka slices,
normalization, the raw output for chunked inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from toolkit.errors import ConfigError, UnsupportedDimensionError

if TYPE_CHECKING:
    from toolkit.cards import ModelCard
    from toolkit.runtime.context import ModelContext
    from toolkit.settings import RuntimeOptions

__all__ = ["OutputPlan", "chunk_plan", "finish", "l2", "matryoshka_card", "plan_output"]


@dataclass(frozen=True)
class OutputPlan:
    """Which graph output to fetch and what numpy does after it."""

    output: str
    dims: int | None = None  # slice to this many dims (Matryoshka "any")
    normalize: bool = False  # L2-normalize after slicing
    head_dims: int | None = None  # the Matryoshka size of a fused head (``sentence_embedding_<d>``) it reads


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def finish(vectors: np.ndarray, plan: OutputPlan) -> np.ndarray:
    """``vectors`` of ``plan.output`` sliced and normalized as the plan says, contiguous float32."""
    if plan.dims is not None:
        vectors = vectors[..., : plan.dims]
    if plan.normalize:
        vectors = l2(vectors)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def matryoshka_card(card: ModelCard, options: RuntimeOptions, native: int) -> ModelCard:
    """``card`` with the options' Matryoshka switch applied (vLLM's hf_overrides ``is_matryoshka`` /
    ``matryoshka_dimensions``): ``matryoshka`` True without sizes allows any of 1..``native``; with
    ``matryoshka_dims``, only those; False, none below ``native``. ConfigError for sizes outside 1..``native``."""
    on, dims = options.matryoshka, options.matryoshka_dims or None  # no sizes listed: as if none given
    if on is None and dims is None:
        return card
    if on is False:
        if dims:
            raise ConfigError("matryoshka_dims goes with matryoshka=True (or alone), not matryoshka=False")
        return msgspec.structs.replace(card, matryoshka_dims=[], matryoshka_any=False)
    if not dims:  # any size; the card's own sizes keep their fused heads
        return msgspec.structs.replace(card, matryoshka_any=True)
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= native]
    if bad:
        raise ConfigError(f"matryoshka_dims {', '.join(map(str, bad))} not in 1..{native}, this model's dimensions "
                          "(--hf-overrides matryoshka_dimensions)")
    return msgspec.structs.replace(card, matryoshka_dims=sorted(set(dims)), matryoshka_any=False)


def plan_output(ctx: ModelContext, dimensions: int | None, normalize: bool | None, modality: str = "text",
                any_size: bool = False) -> OutputPlan:
    """Map (dimensions, normalize) to a graph output of ``modality``'s encoder; UnsupportedDimensionError lists
    the valid sizes. A tower beside the text graph (``encoder.outputs``: final, raw) has one size.

    ``any_size`` (TEI's ``/embed``): any size up to the model's is the raw output cut to it, normalized again
    when ``normalize`` says so, whether or not the model declares Matryoshka sizes."""
    ctx.answers("embed")
    card = ctx.card
    norm = card.normalize if normalize is None else normalize
    native = ctx.dimensions
    if modality != "text":
        final, raw = ctx.encoder(modality).outputs  # normalized as the card says; the projection only
        if dimensions is not None and dimensions != native:
            raise UnsupportedDimensionError(f"dimensions {dimensions} is not supported by this model; "
                                            f"allowed: {native}")
        return OutputPlan(final) if norm == card.normalize else OutputPlan(raw, normalize=norm)
    if dimensions is None or dimensions == native:
        if norm == card.normalize:
            return OutputPlan("sentence_embedding")
        return OutputPlan("sentence_embedding_raw", normalize=norm)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise UnsupportedDimensionError(f"dimensions must be an integer, got {dimensions!r}")
    if any_size and dimensions not in card.matryoshka_dims:
        if dimensions < 1:
            raise UnsupportedDimensionError("`dimensions` should be positive")
        if dimensions > native:
            raise UnsupportedDimensionError(f"`dimensions` should be smaller than the maximum embedding dimension "
                                            f"({native})")
        return OutputPlan("sentence_embedding_raw", dims=dimensions, normalize=norm)
    if dimensions in card.matryoshka_dims:
        head = f"sentence_embedding_{dimensions}"  # fused at export; a size switched on at serve time has none
        if norm == card.normalize and head in ctx.manifest.outputs:
            return OutputPlan(head, head_dims=dimensions)
        return OutputPlan("sentence_embedding_raw", dims=dimensions, normalize=norm)
    if card.matryoshka_any and 1 <= dimensions < native:
        return OutputPlan("sentence_embedding_raw", dims=dimensions, normalize=norm)
    sizes = ", ".join(map(str, sorted({*card.matryoshka_dims, native})))
    allowed = f"any of 1..{native}" if card.matryoshka_any else sizes
    raise UnsupportedDimensionError(f"dimensions {dimensions} is not supported by this model; allowed: {allowed}")


def chunk_plan(card: ModelCard, plan: OutputPlan) -> OutputPlan:
    """The plan for inputs embedded by chunks: the raw (un-normalized) output, averaged over chunks by token
    count (vLLM's chunked processing), then sliced and normalized as ``plan`` would."""
    if plan.output == "sentence_embedding_raw":
        return plan
    return OutputPlan("sentence_embedding_raw", dims=plan.head_dims, normalize=card.normalize)
