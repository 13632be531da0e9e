"""How the session's rows become results: chunk pooling, SPLADE's max, activations, score pairing and
layout, modality splits; and the accepted input forms. Plain numpy, shared by the task table and the routes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toolkit.errors import RequestError
from toolkit.runtime.images import is_image_input
from toolkit.runtime.tokenization import Tokenized

__all__ = ["Inputs", "activate", "as_input_list", "cosine_scores", "cosines", "count_inputs", "expand_chunks", "interleave",
           "pool_chunks", "pool_sparse", "score_pairs", "sparse_entries"]

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def expand_chunks(items: list[Tokenized]) -> tuple[list[Tokenized], list[tuple[int, int]] | None]:
    """Chunked inputs' parts in line with the others; spans[i] = (start, end) of input i in the flat list
    (None when nothing is chunked)."""
    if not any(t.parts for t in items):
        return items, None
    flat: list[Tokenized] = []
    spans = []
    for item in items:
        parts = item.parts or [item]
        spans.append((len(flat), len(flat) + len(parts)))
        flat.extend(parts)
    return flat, spans


def pool_chunks(rows: list[np.ndarray], flat: list[Tokenized], spans: list[tuple[int, int]] | None) -> list[np.ndarray]:
    """Each input's row: its chunks' rows averaged, weighted by their token counts."""
    if spans is None:
        return rows
    out = []
    for start, end in spans:
        if end - start == 1:
            out.append(rows[start])
            continue
        weights = np.array([len(flat[i]) for i in range(start, end)], dtype=np.float64)
        out.append((np.stack(rows[start:end]).astype(np.float64) * weights[:, None]).sum(0) / weights.sum())
    return out


def activate(x: np.ndarray, name: str | None) -> np.ndarray:
    """A cross-encoder's activation (the card's ``activation``) over its logits' last axis."""
    match name:
        case None | "identity":
            return x
        case "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        case "tanh":
            return np.tanh(x)
        case "softmax":
            e = np.exp(x - x.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
    raise RequestError(f"activation '{name}' is not one of: identity, sigmoid, softmax, tanh")


def score_pairs(queries, documents) -> tuple[list, list]:
    """vLLM's score pairing, validated: 1 query with N documents, or N with N (texts, or images for two-tower
    artifacts)."""
    left = [queries] if isinstance(queries, str) or is_image_input(queries) else list(queries)
    right = [documents] if isinstance(documents, str) or is_image_input(documents) else list(documents)
    if not left or not right:
        raise RequestError("both sides of a score need at least one input", param="queries")
    if len(left) not in (1, len(right)):
        raise RequestError(f"{len(left)} queries and {len(right)} documents: give 1 query or {len(right)}",
                           param="queries")
    return left, right


def cosine_scores(vectors: np.ndarray, n_queries: int) -> np.ndarray:
    """Scores of unit ``vectors`` laid out as queries then documents: (n_documents,) float32."""
    a, b = vectors[:n_queries], vectors[n_queries:]
    return np.atleast_1d((a * b).sum(-1) if n_queries > 1 else b @ a[0])


def pool_sparse(rows: list[np.ndarray], spans: list[tuple[int, int]] | None) -> list[np.ndarray]:
    """SPLADE pools by max over tokens, so the max over an input's chunks is exact."""
    if spans is None:
        return rows
    return [np.max(np.stack(rows[start:end]), axis=0) for start, end in spans]


def sparse_entries(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, weights float32) of a vocabulary-sized row's non-zero entries."""
    idx = np.flatnonzero(row > 0)
    return idx.astype(np.int64), row[idx].astype(np.float32)


def interleave(n: int, dims: int, *parts: tuple[list[int], np.ndarray | None]) -> np.ndarray:
    """(n, dims) float32 rows gathered back into input order from (positions, rows) parts."""
    vectors = np.empty((n, dims), dtype=np.float32)
    for positions, rows in parts:
        if positions:
            vectors[positions] = rows
    return vectors


def count_inputs(inputs: Inputs) -> int:
    """How many inputs a request holds: a string or a single list of token ids is one."""
    return 1 if isinstance(inputs, str) or (len(inputs) > 0 and isinstance(inputs[0], int)) else len(inputs)


def as_input_list(inputs: Inputs) -> list[str] | list[list[int]]:
    """Normalize the four accepted input forms; reject empties and mixed lists."""
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    if not items:
        raise RequestError("input must not be empty", param="input")
    if all(isinstance(x, str) for x in items):
        return items
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return [items]
    if all(isinstance(x, (list, tuple)) for x in items):
        return [list(x) for x in items]
    raise RequestError("input must be a string, a list of strings, a list of token ids or a list of such lists", param="input")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two arrays of the same shape (float64; two zero rows count as equal): parity figures."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na < 1e-9) & (nb < 1e-9)
    cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-18)
    return np.where(both_zero, 1.0, cos)
