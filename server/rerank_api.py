"""Reranking: ``/rerank``, ``/v1/rerank`` (vLLM's shape, Jina-compatible), ``/v2/rerank`` (Cohere's), and TEI's
``/rerank``. Cross-encoder artifacts score each (query, document) pair; embedding artifacts rerank by cosine
similarity of the query and each document (a bi-encoder, as vLLM does for embedding models).

``/rerank`` is both vLLM's path and TEI's: a body with ``texts`` is TEI's (answered in TEI's shape: a sorted
list of ``{index, score, text?}``), one with ``documents`` vLLM's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from msgspec import UNSET, UnsetType

from toolkit.errors import ModelKindError, RequestError
from toolkit.runtime.async_embedder import Timings
from toolkit.server.content import admit_content, content_item
from toolkit.server.dispatch import BodyRoute, dispatch_body
from toolkit.server.limits import check_limits, tei_truncation
from toolkit.server.metrics import timing_headers
from toolkit.server.schema import CohereApiVersion, CohereTokens

__all__ = ["CohereRerankResponse", "RerankController", "TEIRank", "VLLMRerankRequest", "VLLMRerankResponse"]


class VLLMRerankRequest(msgspec.Struct, kw_only=True):
    """vLLM's rerank request (Jina's and Cohere's fields)."""

    query: str
    documents: list[Any]
    model: str | None = None
    top_n: int | None = None  # None or 0: all
    return_documents: bool | None = None  # default: true on /rerank and /v1/rerank (Jina, vLLM), false on /v2 (Cohere)
    max_tokens_per_doc: int | None = None
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None  # cross-encoders: False gives the logits (vLLM's; `activation` its old name)
    activation: bool | None = None


class TEIRerankRequest(msgspec.Struct, kw_only=True):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: str = "Right"
    raw_scores: bool = False  # cross-encoders: the logits without the activation (cosines have none)
    return_text: bool = False
    model: str | None = None


class RerankDocument(msgspec.Struct, omit_defaults=True):
    text: str | None = None
    multi_modal: list[Any] | None = None  # vLLM's: an image document's content parts, as sent


class RerankResult(msgspec.Struct):
    index: int
    relevance_score: float
    document: RerankDocument | UnsetType = UNSET  # with return_documents


class RerankUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class VLLMRerankResponse(msgspec.Struct, kw_only=True):
    """vLLM's (and Jina's) rerank answer: results sorted by relevance, best first."""

    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class CohereSearchUnits(msgspec.Struct):
    search_units: int


class CohereRerankMeta(msgspec.Struct):
    api_version: CohereApiVersion
    billed_units: CohereSearchUnits
    tokens: CohereTokens


class CohereRerankResponse(VLLMRerankResponse, kw_only=True):
    """Cohere v2's rerank answer: vLLM's plus Cohere's ``meta``."""

    meta: CohereRerankMeta


class TEIRank(msgspec.Struct):
    """One entry of TEI's rerank answer (a list sorted by score, best first)."""

    index: int
    score: float
    text: str | UnsetType = UNSET  # with return_text


def _document(doc: Any, i: int):
    """A document as the engine reads it: a text (a string, or Cohere's / Jina's ``{"text": ...}``), or vLLM's
    multimodal form ``{"content": [parts]}`` (an image page for a ColQwen2 artifact)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    if isinstance(doc, dict) and isinstance(doc.get("content"), list):
        return content_item(doc["content"], f"documents[{i}]")
    raise RequestError(f"documents[{i}] must be a string, an object with a string 'text', or vLLM's "
                       "{'content': [parts]}", param="documents")


def _echoed(doc: Any, document) -> RerankDocument:
    """A document as ``return_documents`` echoes it: its text, or its content parts (vLLM's ``multi_modal``)."""
    if isinstance(document, str):
        return RerankDocument(text=document)
    return RerankDocument(multi_modal=doc["content"])


async def _ranking(request: Request, model: str | None, query: str, documents: list[str], doc_tokens: int | None,
                   query_tokens: int | None, side: str = "right", timings: Timings | None = None,
                   use_activation: bool | None = None, top_n: int | None = None,
                   max_tokens_per_doc: int | None = None) -> tuple[Any, list[dict], int]:
    """(served model, documents best first as the engine's ``rerank`` ranks them, prompt tokens): a cross-encoder's
    pair scores (``doc_tokens`` bounds each pair), or an embedding model's cosine of query and document (each side
    truncated on its own)."""
    served = request.app.state.registry.get(model)
    if not query:
        raise RequestError("query must not be empty", param="query")
    if not documents:
        raise RequestError("documents must not be empty", param="documents")
    options = request.app.state.options
    check_limits(len(documents) + 1, options, param="documents")
    ranked, tokens = await served.engine.rerank(query, documents, top_n=top_n, use_activation=use_activation,
                                                truncate_prompt_tokens=doc_tokens,
                                                query_truncate_prompt_tokens=query_tokens, truncation_side=side,
                                                timings=timings, max_tokens=options.max_request_tokens,
                                                max_tokens_per_doc=max_tokens_per_doc)
    return served, ranked, tokens


async def vllm_rerank(request: Request, data: VLLMRerankRequest, *, cohere: bool) -> Response[VLLMRerankResponse]:
    started, timings = time.perf_counter(), Timings()
    texts = [_document(doc, i) for i, doc in enumerate(data.documents)]
    if data.top_n is not None and data.top_n < 0:
        raise RequestError("top_n must be >= 0 (0: all documents)", param="top_n")
    served = request.app.state.registry.get(data.model)
    if any(not isinstance(t, str) for t in texts):  # image documents: checked and fetched as the embed routes do
        texts = await admit_content(texts, served.embedder, request.app.state.options, "documents")
    doc_cap = None
    if data.max_tokens_per_doc is not None:  # Cohere / Jina / vLLM: a cap on each document, clamped to the model's
        if data.max_tokens_per_doc < 1:
            raise RequestError("max_tokens_per_doc must be a positive integer", param="max_tokens_per_doc")
        doc_cap = min(data.max_tokens_per_doc, served.embedder.manifest.max_seq_len)
    per_doc = data.truncate_prompt_tokens if data.truncate_prompt_tokens is not None else (-1 if cohere else None)
    if doc_cap is not None and per_doc is None and served.embedder.cross_encoder:  # the document is cut, then the
        per_doc = -1  # pair to the window (an embedding model cuts only the documents to the cap: prepare_rerank)
    activation = next((v for v in (data.activation, data.use_activation) if v is not None), None)
    served, ranked, tokens = await _ranking(request, data.model, data.query, texts, per_doc,
                                            data.truncate_prompt_tokens, timings=timings, top_n=data.top_n,
                                            use_activation=activation, max_tokens_per_doc=doc_cap)
    with_docs = data.return_documents if data.return_documents is not None else not cohere
    results = [RerankResult(r["index"], r["relevance_score"],
                            _echoed(data.documents[r["index"]], texts[r["index"]]) if with_docs else UNSET)
               for r in ranked]
    head = {"id": f"rerank-{uuid.uuid4().hex}", "model": served.name, "results": results,
            "usage": RerankUsage(prompt_tokens=tokens, total_tokens=tokens)}
    if cohere:
        meta = CohereRerankMeta(api_version=CohereApiVersion("2"), billed_units=CohereSearchUnits(1),
                                tokens=CohereTokens(input_tokens=tokens))
        body: VLLMRerankResponse = CohereRerankResponse(**head, meta=meta)
    else:
        body = VLLMRerankResponse(**head)
    return Response(body, headers=timing_headers(timings, started))


async def tei_rerank(request: Request, data: TEIRerankRequest) -> Response[list[TEIRank]]:
    request.state.dialect = "tei"
    emb = request.app.state.registry.get(data.model).embedder
    if emb.text_classifier:  # TEI refuses every non-reranker; an embedding artifact ranks by cosine here (ours)
        raise ModelKindError(f"Backend error: model is not a re-ranker model (this is a {emb.kind} artifact; it "
                             f"answers {', '.join(emb.tasks)})", param="query")
    started, timings = time.perf_counter(), Timings()
    truncation = tei_truncation(data.truncate, data.truncation_direction)
    limit = truncation["truncate_prompt_tokens"]
    _, ranked, tokens = await _ranking(request, data.model, data.query, data.texts, limit, limit,
                                       truncation["truncation_side"], timings, use_activation=not data.raw_scores)
    body = [TEIRank(r["index"], r["relevance_score"], data.texts[r["index"]] if data.return_text else UNSET)
            for r in ranked]
    return Response(body, headers={**timing_headers(timings, started), "x-compute-tokens": str(tokens)})


class RerankController(Controller):
    tags = ["Rerank"]

    @post("/rerank", status_code=200,
          summary="Rerank documents: vLLM's body (query + documents) or TEI's (query + texts), told apart by the body")
    async def rerank(self, request: Request) -> Response[VLLMRerankResponse | list[TEIRank]]:
        return await dispatch_body(request, RERANK_BODIES,
                                   "`documents` (vLLM / Jina / Cohere body) or `texts` (TEI body), exactly one")

    @post("/v1/rerank", status_code=200, summary="Rerank documents (vLLM, Jina-compatible)")
    async def rerank_v1(self, request: Request, data: VLLMRerankRequest) -> Response[VLLMRerankResponse]:
        return await vllm_rerank(request, data, cohere=False)

    @post("/v2/rerank", status_code=200, summary="Rerank documents (Cohere v2)")
    async def rerank_v2(self, request: Request, data: VLLMRerankRequest) -> Response[CohereRerankResponse]:
        return await vllm_rerank(request, data, cohere=True)


async def _vllm_body(request: Request, data: VLLMRerankRequest) -> Response[VLLMRerankResponse]:
    return await vllm_rerank(request, data, cohere=False)


RERANK_BODIES = (BodyRoute(("texts",), TEIRerankRequest, tei_rerank, exclusive=("documents",), dialect="tei"),
                 BodyRoute(("documents",), VLLMRerankRequest, _vllm_body, exclusive=("texts",)))
