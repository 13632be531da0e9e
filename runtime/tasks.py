"""The task table: every pooling task's recipe, written once for both engines.

A task (vLLM's pooling tasks: ``embed``, ``token_embed``, ``embed_sparse``, ``classify``, ``score``,
``rerank``, and ``embed_images`` for two-tower artifacts) is three things:

- ``check``: what it needs from the artifact (a RequestError naming what the artifact answers);
- ``prepare``: how its inputs become model inputs (tokenized texts, preprocessed images), as one or
  more ``Run`` s of ``(items, graph output)``, and how many tokens they count;
- ``reduce``: how the session's rows (one list per run, in input order) become the result.

``Embedder.perform`` runs a task's runs one after the other with ``Embedder.run``; ``AsyncModelContext.perform``
admits, prepares off the event loop when big, queues every run on the shared batcher and reduces. Both
call the same ``check``, ``prepare`` and ``reduce``, in that order, so the engines cannot drift.

Adding a task: write its ``Task`` and ``register`` it; both engines, ``/pooling`` and ``toolkit embed``
find it by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import RequestError
from toolkit.runtime.encoders import by_modality, modality_of
from toolkit.runtime.images import as_image_list
from toolkit.runtime.late_interaction import kept_rows, max_sim, mode_of, tokenize_mode
from toolkit.runtime.outputs import chunk_plan, finish, plan_output
from toolkit.runtime.pooling import (
    activate,
    cosine_scores,
    count_inputs,
    expand_chunks,
    interleave,
    pool_chunks,
    pool_sparse,
    score_pairs,
    sparse_entries,
)
from toolkit.runtime.tokenization import INLINE_CHARS

if TYPE_CHECKING:
    from toolkit.runtime.context import ModelContext

__all__ = ["TASKS", "Prepared", "Run", "Task", "is_pair", "labelled", "register", "require", "task_for"]


@dataclass(frozen=True)
class Run:
    """Model inputs for one graph output: ``items`` (Tokenized or Pixels) through ``output``."""

    items: Sequence
    output: str
    modality: str = "text"  # whose encoder runs the items (the artifact's encoders: toolkit.runtime.encoders)


@dataclass
class Prepared:
    """A task's model inputs and how to turn their rows into its result."""

    runs: list[Run]
    reduce: Callable[[list[list[np.ndarray]]], Any]  # rows per run, in input order -> the result
    tokens: int = 0  # what the request counts (usage, the per-request token limit)
    images: list = field(default_factory=list)  # decoded images (Pixels), for usage and image metadata


@dataclass(frozen=True)
class Task:
    """One entry of the table (see the module docstring)."""

    name: str
    prepare: Callable[..., Prepared]  # (embedder, inputs, **params) -> Prepared; checks what it needs first
    # (embedder, *inputs) -> how many inputs are admitted against the queue bound, before any work
    count: Callable[..., int] = lambda ctx, inputs: count_inputs(inputs)
    inline: Callable[..., bool] = lambda *inputs: False  # (*inputs) -> prepare on the event loop (cheap) or in a thread
    param: str = "input"  # the request field an error about the inputs (too many tokens) points at
    base: str | None = None  # the manifest task it builds on (rerank on score): it applies where that one does
    # per-input rows of its result, for the routes and apps that present any task (/pooling, toolkit embed);
    # None: its result is not one row per input (scores of pairs, rankings)
    rows: Callable[[ModelContext, Any], list[np.ndarray]] | None = None
    modality: str = "text"  # what its inputs are: "text" (or token ids), "image", "mixed" (routes offer text tasks)
    description: str = ""

    @functools.cached_property
    def takes_prompt(self) -> bool:
        """Whether its preparation reads a prompt name (``prompt_name``, or any tokenizer option); read once per
        task, not per call."""
        parameters = inspect.signature(self.prepare).parameters.values()
        return any(p.name == "prompt_name" or p.kind is p.VAR_KEYWORD for p in parameters)

    def applies(self, ctx: ModelContext) -> bool:
        """Whether the artifact answers it: its manifest lists this task, or the one it builds on."""
        return (self.base or self.name) in ctx.tasks


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the table (its name must be new)."""
    if task.name in TASKS:
        raise ValueError(f"task '{task.name}' is registered already")
    TASKS[task.name] = task
    return task


def task_for(name: str) -> Task:
    """The table's entry ``name``; RequestError listing the tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise RequestError(f"task '{name}' is not one of: {', '.join(TASKS)}", param="task") from None


def require(ctx: ModelContext, task: str) -> Task | None:
    """The table's entry ``task`` (None for a manifest task outside the table) once the artifact is known to answer
    it; RequestError naming what it answers otherwise (a task that builds on another, as rerank on score, applies
    where that one does)."""
    entry = TASKS.get(task)
    if entry is None:
        ctx.answers(task)
    elif not entry.applies(ctx):
        ctx.answers(entry.name)
    return entry


_INLINE_INPUTS = 8


def small_text(inputs, *rest) -> bool:
    """Few, short texts (or token ids): tokenized inline on the event loop; anything bigger in a thread."""
    items = [inputs] if isinstance(inputs, str) else inputs
    chars = sum(len(x) if isinstance(x, str) else sum(len(s) for s in x) if is_pair(x) else 0 for x in items)
    return len(items) <= _INLINE_INPUTS and chars <= INLINE_CHARS


def _tokens(items) -> int:
    return sum(len(t) for t in items)


# ---------------------------------------------------------------- embed (text)
def prepare_embed(ctx: ModelContext, inputs, *, dimensions: int | None = None, normalize: bool | None = None,
                  any_size: bool = False, **tokenize) -> Prepared:
    own = own_inputs(ctx, "text", inputs, dimensions=dimensions, normalize=normalize, any_size=any_size, **tokenize)
    if own is not None:
        return own
    plan = plan_output(ctx, dimensions, normalize, any_size=any_size)
    return embed_items(ctx, ctx.tokenize_inputs(inputs, **tokenize), plan)


def own_inputs(ctx: ModelContext, modality: str, inputs, **params) -> Prepared | None:
    """The embedding of ``inputs`` where ``modality``'s encoder builds its own model inputs from raw items (a
    vision-language encoder renders prompts around texts and images itself); None where it does not."""
    encoder = ctx.encoders.get(modality)
    if encoder is None or not encoder.builds_inputs:
        return None
    items, plan = encoder.model_inputs(inputs, **params)
    return Prepared([Run(items, plan.output, encoder.modality)], lambda rows: finish(np.stack(rows[0]), plan),
                    tokens=_tokens(items), images=[image for item in items for image in item.images])


def embed_items(ctx: ModelContext, items: list, plan) -> Prepared:
    """Sentence vectors of tokenized ``items`` by ``plan`` (an ``OutputPlan``)."""
    flat, spans = expand_chunks(items)
    if spans is not None:  # chunked mode: the raw output averaged over chunks, then sliced and normalized
        plan = chunk_plan(ctx.card, plan)
    return Prepared([Run(flat, plan.output)], lambda rows: finish(np.stack(pool_chunks(rows[0], flat, spans)), plan),
                    tokens=_tokens(items))


# ---------------------------------------------------------------- embed_images (two-tower artifacts)
def prepare_images(ctx: ModelContext, images, *, dimensions: int | None = None, normalize: bool | None = None) -> Prepared:
    own = own_inputs(ctx, "image", as_image_list(images), dimensions=dimensions, normalize=normalize)
    if own is not None:
        return own
    plan = plan_output(ctx, dimensions, normalize, modality="image")
    pixels = ctx.encoder("image").load(images)
    return Prepared([Run(pixels, plan.output, "image")], lambda rows: finish(np.stack(rows[0]), plan),
                    tokens=_tokens(pixels), images=pixels)


def prepare_mixed(ctx: ModelContext, inputs: list, *, modality=modality_of, dimensions: int | None = None,
                  normalize: bool | None = None, **tokenize) -> Prepared:
    """Inputs of several modalities in one list (two-tower artifacts): each group through its modality's embedding
    task (``embed_task``), rows back in input order; an image counts the positions its tower reads as tokens.
    ``modality`` tells an input's modality (default: whichever encoder accepts it, ``modality_of``)."""
    groups = by_modality(inputs, modality)
    if ctx.shares_encoder(groups):  # one encoder reads every modality here: one run where it builds its own (VL)
        own = own_inputs(ctx, next(iter(groups)), inputs, dimensions=dimensions, normalize=normalize, **tokenize)
        if own is not None:
            return own
    if set(groups) <= {"text"}:
        return prepare_embed(ctx, inputs, dimensions=dimensions, normalize=normalize, **tokenize)
    parts = [(at, embed_task(name).prepare(ctx, [inputs[i] for i in at], dimensions=dimensions, normalize=normalize,
                                           **(tokenize if name == "text" else {})))  # tokenizer options: text only
             for name, at in groups.items()]
    return _combine(len(inputs), parts, lambda vectors: vectors)


def embed_task(modality: str) -> Task:
    """The table's embedding task for one modality's inputs (``embed`` for text, ``embed_images``, ...)."""
    for task in TASKS.values():
        if task.modality == modality and "embed" in (task.name, task.base):
            return task
    raise RequestError(f"no embedding task reads {modality} inputs", param="input")


def _combine(n: int, parts: list[tuple[list[int], Prepared]], finish: Callable[[np.ndarray], Any]) -> Prepared:
    """Several prepared parts (positions, Prepared) as one: their runs in a row, their results interleaved."""
    runs = [run for _, part in parts for run in part.runs]

    def reduce(rows: list[list[np.ndarray]]):
        results, at = [], 0
        for positions, part in parts:
            results.append((positions, part.reduce(rows[at:at + len(part.runs)])))
            at += len(part.runs)
        return finish(interleave(n, results[0][1].shape[1], *results))

    return Prepared(runs, reduce, tokens=sum(part.tokens for _, part in parts),
                    images=[p for _, part in parts for p in part.images])


# ---------------------------------------------------------------- token_embed
def prepare_token_embed(ctx: ModelContext, inputs, *, is_query: bool | None = None, **tokenize) -> Prepared:
    """Per-token vectors; on a late-interaction artifact, the vectors it scores in query or document mode
    (``is_query``, or ``prompt_name`` "query" / "document"; default document)."""
    if ctx.late_interaction is not None:
        mode = mode_of(is_query, tokenize.pop("prompt_name", None))
        return multi_vector_items(ctx, inputs, mode, prompt=tokenize.get("prompt"),
                                  truncate_prompt_tokens=tokenize.get("truncate_prompt_tokens"))
    if is_query is not None:
        raise RequestError("is_query applies to late-interaction (multi-vector) artifacts only", param="is_query")
    items = ctx.tokenize_inputs(inputs, **tokenize)
    if any(t.parts for t in items):
        raise RequestError("token embeddings of an input longer than the model's window are not supported in "
                           "chunked mode; truncate it", param="input")
    return Prepared([Run(items, ctx.token_output)],
                    lambda rows: [ctx.token_states(s, len(t)) for s, t in zip(rows[0], items)], tokens=_tokens(items))


def multi_vector_items(ctx: ModelContext, texts, mode: str, *, prompt: str | None = None,
                       truncate_prompt_tokens: int | None = None) -> Prepared:
    """A late-interaction artifact's (tokens, dim) vectors of ``texts`` in ``mode`` (``toolkit.runtime.late_interaction``)."""
    late = ctx.late_interaction
    encoder = ctx.encoders.get("text")
    if encoder is not None and encoder.builds_inputs:  # ColVision: the processor's prompt per kind of item
        built = encoder.multi_vector_inputs(texts, prompt=prompt, truncate_prompt_tokens=truncate_prompt_tokens)
        return Prepared([Run(built, ctx.token_output, "text")],  # the encoder the text key names reads them all
                        lambda rows: [np.ascontiguousarray(ctx.unpad(r, len(t)), dtype=np.float32)
                                      for r, t in zip(rows[0], built)],
                        tokens=_tokens(built), images=[image for item in built for image in item.images])
    items = tokenize_mode(ctx, late, texts, mode, prompt=prompt, truncate_prompt_tokens=truncate_prompt_tokens)
    return Prepared([Run(items, ctx.token_output)],
                    lambda rows: [kept_rows(late, ctx.unpad(r, len(t)), t, mode) for r, t in zip(rows[0], items)],
                    tokens=_tokens(items))


def max_sim_scores(ctx: ModelContext, queries: list, documents: list, *, query_limit: int | None = None,
                   document_limit: int | None = None) -> Prepared:
    """MaxSim of queries (query mode) against documents (document mode), vLLM's pairing: (n_documents,) scores."""
    late = ctx.late_interaction
    left = multi_vector_items(ctx, queries, "query", truncate_prompt_tokens=query_limit)
    right = multi_vector_items(ctx, documents, "document", truncate_prompt_tokens=document_limit)

    def reduce(rows):
        q, d = left.reduce(rows[:1]), right.reduce(rows[1:])
        mean = late.similarity == "meanmaxsim"
        return max_sim(q, d, mean=mean)[0] if len(q) == 1 else max_sim(q, d, mean=mean, pairwise=True)

    return Prepared(left.runs + right.runs, reduce, tokens=left.tokens + right.tokens,
                    images=left.images + right.images)


# ---------------------------------------------------------------- embed_sparse
def prepare_sparse(ctx: ModelContext, inputs, **tokenize) -> Prepared:
    return sparse_items(ctx.tokenize_inputs(inputs, **tokenize))


def sparse_items(items: list) -> Prepared:
    """SPLADE's (indices, weights) of tokenized ``items``; it pools by max, so the max over chunks is exact."""
    flat, spans = expand_chunks(items)
    return Prepared([Run(flat, "sparse_embedding")],
                    lambda rows: [sparse_entries(row) for row in pool_sparse(rows[0], spans)], tokens=_tokens(items))


# ---------------------------------------------------------------- classify
def prepare_classify(ctx: ModelContext, inputs, *, use_activation: bool | None = True,
                     truncate_prompt_tokens: int | None = None, **tokenize) -> Prepared:
    """Per-label scores (the card's activation unless ``use_activation`` is False) of texts, token ids, or text
    pairs (a two-string list or tuple in the list, as TEI's /predict takes them: read as the tokenizer pairs them)."""
    listed = [inputs] if isinstance(inputs, str) else list(inputs)
    paired = [i for i, x in enumerate(listed) if is_pair(x)]
    if not paired:
        items = ctx.tokenize_inputs(inputs, truncate_prompt_tokens=truncate_prompt_tokens, **tokenize)
    else:  # texts and pairs tokenized apart, put back in input order
        single = [i for i, x in enumerate(listed) if not is_pair(x)]
        items = [None] * len(listed)
        if single:
            texts = ctx.tokenize_inputs([listed[i] for i in single], truncate_prompt_tokens=truncate_prompt_tokens,
                                        **tokenize)
            for i, item in zip(single, texts):
                items[i] = item
        pairs = tokenize_pairs(ctx, [listed[i][0] for i in paired], [listed[i][1] for i in paired],
                               truncate_prompt_tokens=truncate_prompt_tokens)
        for i, item in zip(paired, pairs):
            items[i] = item

    def reduce(rows):
        logits = np.stack(rows[0])
        return activate(logits, ctx.card.activation) if use_activation is not False else logits

    return Prepared([Run(items, "logits")], reduce, tokens=_tokens(items))


def is_pair(item) -> bool:
    """A (text, text) pair among classify's inputs."""
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)


def labelled(ctx: ModelContext, scores: np.ndarray, top_k: int | None = None) -> list[list[dict]]:
    """(n, labels) scores -> per input ``{"label", "score"}`` best first (ties in label order), the first ``top_k``
    (all when None)."""
    names = ctx.labels
    return [[{"label": names[j], "score": float(row[j])} for j in rank_order(row, top_k)] for row in scores]


# ---------------------------------------------------------------- score
def prepare_score(ctx: ModelContext, queries, documents=None, *, use_activation: bool | None = None,
                  truncate_prompt_tokens: int | None = None, max_tokens_per_doc: int | None = None,
                  **tokenize) -> Prepared:
    """vLLM's pairing (1-1, 1-N, N-N): a cross-encoder's pair scores (its activation unless ``use_activation`` is
    False), or the cosines of an embedding artifact's vectors (texts or, for two towers, images on either side)."""
    left, right = score_pairs(queries, documents)
    if use_activation is not None and not ctx.cross_encoder:
        raise RequestError("use_activation applies to cross-encoder scores; this is an embedding model, "
                           "whose scores are cosine similarities", param="use_activation")
    if ctx.late_interaction is not None:  # MaxSim: queries in query mode, documents in document mode
        return max_sim_scores(ctx, left, right, query_limit=truncate_prompt_tokens,
                              document_limit=_doc_limit(truncate_prompt_tokens, max_tokens_per_doc))
    if ctx.cross_encoder:
        items = tokenize_pairs(ctx, left, right, truncate_prompt_tokens=truncate_prompt_tokens,
                               max_tokens_per_doc=max_tokens_per_doc)
        return Prepared([Run(items, "logits")], lambda rows: pair_scores(ctx, rows[0], use_activation),
                        tokens=_tokens(items))
    both = prepare_mixed(ctx, left + right, normalize=True, truncate_prompt_tokens=truncate_prompt_tokens, **tokenize)
    return Prepared(both.runs, lambda rows: cosine_scores(both.reduce(rows), len(left)), tokens=both.tokens,
                    images=both.images)


def tokenize_pairs(ctx: ModelContext, queries: list[str], documents: list[str], *,
                   truncate_prompt_tokens: int | None = None, max_tokens_per_doc: int | None = None) -> list:
    """(query, document) pairs tokenized as the cross-encoder reads them; one query pairs with every document, each
    document first cut to ``max_tokens_per_doc`` tokens when given (vLLM's rerank field: the document's, not the
    pair's)."""
    if any(not t for t in (*queries, *documents)):
        raise RequestError("queries and documents must not be empty strings", param="documents")
    firsts = queries * len(documents) if len(queries) == 1 else queries
    return ctx.tokenizer.encode_pairs(firsts, documents, truncate=ctx.truncation(truncate_prompt_tokens),
                                      second_limit=max_tokens_per_doc)


def pair_scores(ctx: ModelContext, rows: list[np.ndarray], use_activation: bool | None = True) -> np.ndarray:
    """(n,) scores from a one-label cross-encoder's logits rows."""
    logits = np.stack(rows).astype(np.float32)  # (n, labels)
    if logits.shape[1] != 1:
        raise RequestError(f"this cross-encoder has {logits.shape[1]} labels; scores need one (use /pooling "
                           "with task classify for per-label scores)", param="model")
    return activate(logits[:, 0], ctx.card.activation) if use_activation is not False else logits[:, 0]


def _score_inputs(ctx: ModelContext, queries, documents=None) -> int:
    """A cross-encoder runs one pair a document; an embedding artifact embeds both sides."""
    left, right = score_pairs(queries, documents)
    return len(right) if ctx.cross_encoder else len(left) + len(right)


# ---------------------------------------------------------------- rerank
def prepare_rerank(ctx: ModelContext, query: str, documents: Sequence[str], *, top_n: int | None = None,
                   return_documents: bool = False, use_activation: bool | None = None,
                   truncate_prompt_tokens: int | None = None, query_truncate_prompt_tokens: int | None = None,
                   truncation_side: str = "right", max_tokens_per_doc: int | None = None) -> Prepared:
    """Documents best first: ``{"index", "relevance_score"[, "document"]}``. A cross-encoder scores each
    (query, document) pair cut to ``truncate_prompt_tokens``; an embedding artifact the cosine of the query's and
    each document's vectors, the query cut to ``query_truncate_prompt_tokens`` (default: the documents' limit).
    ``max_tokens_per_doc`` (Cohere's / vLLM's field) cuts each document first, never the query."""
    documents = list(documents)
    if ctx.late_interaction is not None:
        q_limit = truncate_prompt_tokens if query_truncate_prompt_tokens is None else query_truncate_prompt_tokens
        scored = max_sim_scores(ctx, [query], documents, query_limit=q_limit,
                                document_limit=_doc_limit(truncate_prompt_tokens, max_tokens_per_doc))
    elif ctx.cross_encoder:
        scored = prepare_score(ctx, query, documents, use_activation=use_activation,
                               truncate_prompt_tokens=truncate_prompt_tokens, max_tokens_per_doc=max_tokens_per_doc)
    else:
        side = {"truncation_side": truncation_side, "normalize": True}
        q_limit = truncate_prompt_tokens if query_truncate_prompt_tokens is None else query_truncate_prompt_tokens
        d_limit = _doc_limit(truncate_prompt_tokens, max_tokens_per_doc)
        parts = [([0], prepare_embed(ctx, [query], truncate_prompt_tokens=q_limit, **side)),
                 (list(range(1, len(documents) + 1)), prepare_embed(ctx, documents,
                                                                   truncate_prompt_tokens=d_limit, **side))]
        scored = _combine(len(documents) + 1, parts, lambda vectors: cosine_scores(vectors, 1))

    def reduce(rows):
        scores = scored.reduce(rows)
        return [{"index": int(i), "relevance_score": float(scores[i]),
                 **({"document": documents[i]} if return_documents else {})} for i in rank_order(scores, top_n)]

    return Prepared(scored.runs, reduce, tokens=scored.tokens)


def _doc_limit(truncate_prompt_tokens: int | None, max_tokens_per_doc: int | None) -> int | None:
    """A document's token limit: the call's truncation, cut further by ``max_tokens_per_doc``."""
    if max_tokens_per_doc is None:
        return truncate_prompt_tokens
    return max_tokens_per_doc if truncate_prompt_tokens in (None, -1) else min(truncate_prompt_tokens, max_tokens_per_doc)


def rank_order(scores: np.ndarray, top_n: int | None = None) -> np.ndarray:
    """Indices best first (ties keep input order), the first ``top_n`` (all when None or 0)."""
    return np.argsort(-scores, kind="stable")[: top_n or None]


def _listed(ctx: ModelContext, result) -> list[np.ndarray]:
    return list(result)


def _densified(ctx: ModelContext, result) -> list[np.ndarray]:
    """SPLADE's (indices, weights) as vocabulary-sized rows (vLLM's /pooling ``embed`` of a sparse model)."""
    rows = []
    for indices, values in result:
        row = np.zeros(ctx.dimensions, dtype=np.float32)
        row[indices] = values
        rows.append(row)
    return rows


register(Task("embed", prepare_embed, inline=small_text, rows=_listed, description="sentence vectors (n, dimensions)"))
register(Task("embed_images", prepare_images, count=lambda ctx, images: len(as_image_list(images)), base="embed",
              rows=_listed, modality="image", description="image vectors (two-tower artifacts)"))
register(Task("embed_mixed", prepare_mixed, count=lambda ctx, items: len(items), base="embed", rows=_listed,
              modality="mixed", description="texts and images in one list (two-tower artifacts)"))
register(Task("token_embed", prepare_token_embed, inline=small_text, rows=_listed, description="per-token vectors"))
register(Task("embed_sparse", prepare_sparse, inline=small_text, rows=_densified,
              description="SPLADE (indices, weights)"))
register(Task("classify", prepare_classify, inline=small_text, rows=_listed, description="per-label scores"))
register(Task("score", prepare_score, count=_score_inputs, param="documents", description="pair scores or cosines"))
register(Task("rerank", prepare_rerank, count=lambda ctx, query, documents: len(documents) + 1, param="documents",
              base="score", description="documents best first"))
