"""Late interaction (ColBERT): query and document modes, the positions a model scores, and MaxSim.

What a mode does is the manifest's ``LateInteraction`` (read from the checkpoint by the exporter), applied as
sentence-transformers' ``MultiVectorEncoder`` applies it:

- a query gets the query prompt and is cut to the query length; with expansion, it is padded with the expansion
  token ([MASK]) up to the expansion length, those positions read with attention mask 0 (unless the model attends
  to them) and scored;
- a document gets the document prompt and is cut to the document length; the skiplist's tokens (punctuation) are
  dropped from its vectors;
- MaxSim(q, d) = sum over q's vectors of the best dot product with d's (unit vectors: cosines), computed for all
  documents of a call at once over a padded (documents, tokens, dim) array and its mask.

Pure functions over the context's tokenizer and numpy arrays; the task table (``toolkit.runtime.tasks``) builds its
runs from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import RequestError
from toolkit.manifest import LateInteraction
from toolkit.runtime.tokenization import Tokenized

if TYPE_CHECKING:
    from toolkit.runtime.context import ModelContext

__all__ = ["MODES", "kept_rows", "max_sim", "mode_of", "pad_vectors", "tokenize_mode"]

MODES = ("query", "document")
_CHUNK_ELEMENTS = 32_000_000  # similarities held at once (128 MB of float32): queries are scored in groups under it


def mode_of(is_query: bool | None, prompt_name: str | None) -> str:
    """The mode a call asks for: ``is_query`` (PyLate's), else ``prompt_name`` "query" / "document" (vLLM's and
    sentence-transformers' name for it), else document (``MultiVectorEncoder.encode``'s default)."""
    if is_query is not None:
        if prompt_name is not None and prompt_name != ("query" if is_query else "document"):
            raise RequestError(f"is_query={is_query} contradicts prompt_name '{prompt_name}'", param="prompt_name")
        return "query" if is_query else "document"
    if prompt_name is None:
        return "document"
    if prompt_name not in MODES:
        raise RequestError(f"prompt_name '{prompt_name}' is not one of: {', '.join(MODES)}", param="prompt_name")
    return prompt_name


def tokenize_mode(ctx: ModelContext, late: LateInteraction, texts: Sequence[str], mode: str, *,
                  prompt: str | None = None, truncate_prompt_tokens: int | None = None) -> list[Tokenized]:
    """``texts`` as the model reads them in ``mode`` (``prompt``: instead of the mode's own prompt); a query's
    expansion positions carry ``Tokenized.mask`` 0 unless the model attends to them."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise RequestError("late-interaction inputs are non-empty strings", param="input")
    prefix = late.prompts.get(mode, "") if prompt is None else prompt
    window = ctx.tokenizer.max_length
    expanding = mode == "query" and late.expansion is not None
    match (mode, late.expansion if expanding else None):
        case ("query", "fixed"):
            limit = late.expansion_length
        case ("query", "min"):
            limit = max(late.query_length or window, late.expansion_length)
        case ("query", None):
            limit = late.query_length or window
        case ("document", _):
            limit = late.document_length or window
        case _:
            raise RequestError(f"mode '{mode}' is not one of: {', '.join(MODES)}", param="input_type")
    if truncate_prompt_tokens not in (None, -1):
        limit = min(limit, int(truncate_prompt_tokens))
    items = ctx.tokenizer.encode([prefix + t for t in texts], truncate=min(limit, window))
    if not expanding:
        return items
    return [_expanded(item, late) for item in items]


def _expanded(item: Tokenized, late: LateInteraction) -> Tokenized:
    missing = max(late.expansion_length - len(item), 0)
    if not missing:
        return item
    types = None if item.type_ids is None else [*item.type_ids, *[0] * missing]
    return Tokenized([*item.ids, *[late.expansion_id] * missing], types,
                     mask=[1] * len(item) + [int(late.attend_expansion)] * missing)


def kept_rows(late: LateInteraction, vectors: np.ndarray, item: Tokenized, mode: str) -> np.ndarray:
    """One input's scored vectors (tokens, dim) out of its unpadded rows: every position the model reads or
    expands, less the skiplist's tokens in the modes it applies to (MultiVectorMask's rule)."""
    if mode in late.skiplist_modes and late.skiplist_ids:
        keep = ~np.isin(np.asarray(item.ids), late.skiplist_ids)
        vectors = vectors[keep]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def pad_vectors(matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length (tokens, dim) matrices -> (n, longest, dim) float32 zero-padded, and its (n, longest) mask."""
    longest = max((len(m) for m in matrices), default=0)
    dim = matrices[0].shape[1] if matrices else 0
    stacked = np.zeros((len(matrices), max(longest, 1), dim), dtype=np.float32)
    mask = np.zeros((len(matrices), max(longest, 1)), dtype=bool)
    for i, m in enumerate(matrices):
        stacked[i, :len(m)] = m
        mask[i, :len(m)] = True
    return stacked, mask


def max_sim(queries: Sequence[np.ndarray], documents: Sequence[np.ndarray], *, mean: bool = False,
            pairwise: bool = False) -> np.ndarray:
    """MaxSim scores: (n_queries, n_documents) float32, or (n,) of matched pairs with ``pairwise``; ``mean``: each
    divided by its query's token count (MeanMaxSim). All documents at once: one (queries, documents, q_tokens,
    d_tokens) similarity array per group of queries, padded positions masked out."""
    if pairwise and len(queries) != len(documents):
        raise RequestError(f"{len(queries)} queries and {len(documents)} documents cannot be paired",
                           param="documents")
    docs, doc_mask = pad_vectors(documents)  # (n_docs, d_tokens, dim), (n_docs, d_tokens)
    query_array, query_mask = pad_vectors(queries)  # (n_q, q_tokens, dim)
    # padded document positions never win a max: -inf added to their similarities (BLAS matmuls, no einsum loop)
    hidden = np.where(doc_mask, np.float32(0.0), np.float32(-np.inf))  # (n_docs, d_tokens)
    if pairwise:
        sims = np.matmul(query_array, docs.transpose(0, 2, 1)) + hidden[:, None, :]  # (n, q_tokens, d_tokens)
        best = sims.max(-1)  # (n, q_tokens)
        scores = np.where(query_mask & doc_mask.any(-1, keepdims=True), best, 0.0).sum(-1)
    else:
        n_docs, d_tokens, dim = docs.shape
        q_tokens = query_array.shape[1]
        flat_docs = docs.reshape(-1, dim).T  # (dim, n_docs * d_tokens)
        flat_hidden = hidden.reshape(-1)
        step = max(1, _CHUNK_ELEMENTS // max(1, n_docs * d_tokens * q_tokens))
        scores = np.empty((len(queries), len(documents)), dtype=np.float32)
        for start in range(0, len(queries), step):
            group = query_array[start:start + step]  # (q, q_tokens, dim)
            sims = group.reshape(-1, dim) @ flat_docs  # (q * q_tokens, n_docs * d_tokens)
            sims += flat_hidden
            best = sims.reshape(len(group), q_tokens, n_docs, d_tokens).max(-1).transpose(0, 2, 1)  # (q, n, q_tok)
            valid = query_mask[start:start + step, None, :] & doc_mask.any(-1)[None, :, None]
            scores[start:start + step] = np.where(valid, best, 0.0).sum(-1)
    if mean:
        counts = np.maximum(query_mask.sum(-1), 1).astype(np.float32)
        scores = scores / (counts if pairwise else counts[:, None])
    return np.asarray(scores, dtype=np.float32)
