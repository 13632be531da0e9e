"""text-embeddings-inference's routes, so a TEI client switches without a change: ``/embed``, ``/embed_all``,
``/embed_sparse``, ``/similarity``, ``/decode``, ``/info`` (``/rerank`` lives in ``rerank_api`` and ``/tokenize``
in ``vllm_api``: their paths are vLLM's too, told apart by the body; ``POST /``, ``GET /`` and ``/ping`` are
assembled in ``server/app.py``).

Errors on these routes come in TEI's shape and status codes (see ``server.errors``).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post

from toolkit.errors import RequestError
from toolkit.runtime.async_embedder import Timings
from toolkit.runtime.pooling import count_inputs
from toolkit.server.limits import check_limits, tei_truncation
from toolkit.server.metrics import timing_headers

__all__ = ["TEIController", "TEIEmbedRequest", "TEISimilarityRequest", "TEITokensRequest", "tei_embed",
           "tei_embed_sparse", "tei_similarity"]


class TEIEmbedRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[Any]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str = "Right"
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None  # an extension: TEI serves one model


class TEITokensRequest(msgspec.Struct, kw_only=True):
    """``/embed_all`` and ``/embed_sparse``."""

    inputs: str | list[Any]
    truncate: bool | None = None
    truncation_direction: str = "Right"
    prompt_name: str | None = None
    model: str | None = None


class TEISimilarityInputs(msgspec.Struct):
    source_sentence: str
    sentences: list[str]


class TEISimilarityParameters(msgspec.Struct, kw_only=True):
    truncate: bool | None = None
    truncation_direction: str = "Right"
    prompt_name: str | None = None


class TEISimilarityRequest(msgspec.Struct, kw_only=True):
    """What ``huggingface_hub.InferenceClient.sentence_similarity`` sends."""

    inputs: TEISimilarityInputs
    parameters: TEISimilarityParameters | None = None
    model: str | None = None


class TEIDecodeRequest(msgspec.Struct, kw_only=True):
    ids: list[Any]  # one list of token ids, or a list of them
    skip_special_tokens: bool = True
    model: str | None = None


def _begin(request: Request, data) -> tuple[Any, dict, Timings, float]:
    request.state.dialect = "tei"
    served = request.app.state.registry.get(data.model)
    check_limits(count_inputs(data.inputs), request.app.state.options, param="inputs")
    tokenize = {**tei_truncation(data.truncate, data.truncation_direction), "prompt_name": data.prompt_name,
                "max_tokens": request.app.state.options.max_request_tokens}
    return served, tokenize, Timings(), time.perf_counter()


def _headers(timings: Timings, started: float, tokens: int) -> dict[str, str]:
    return {**timing_headers(timings, started), "x-compute-tokens": str(tokens)}


async def tei_embed(request: Request, data: TEIEmbedRequest) -> Response:
    """TEI's ``/embed`` (and ``POST /`` of an embedding artifact). ``dimensions`` is TEI's: any size up to the
    model's, the vector cut to it and normalized again when ``normalize`` is on (vLLM's routes take declared
    Matryoshka sizes only)."""
    served, tokenize, timings, started = _begin(request, data)
    vectors, tokens = await served.engine.embed(data.inputs, dimensions=data.dimensions, normalize=data.normalize,
                                                any_size=True, timings=timings, **tokenize)
    return Response(vectors.tolist(), headers=_headers(timings, started, tokens))


async def tei_embed_sparse(request: Request, data: TEITokensRequest) -> Response:
    served, tokenize, timings, started = _begin(request, data)
    entries, tokens = await served.engine.embed_sparse(data.inputs, timings=timings, **tokenize)
    body = [[{"index": int(i), "value": float(v)} for i, v in zip(idx, val)] for idx, val in entries]
    return Response(body, headers=_headers(timings, started, tokens))


async def tei_similarity(request: Request, data: TEISimilarityRequest) -> Response:
    """The cosine of ``source_sentence``'s embedding with each of ``sentences``' (TEI's ``/similarity``)."""
    request.state.dialect = "tei"
    served = request.app.state.registry.get(data.model)
    served.embedder.require("embed")
    if not data.inputs.sentences:
        raise RequestError("`inputs.sentences` cannot be empty", param="inputs")
    check_limits(len(data.inputs.sentences) + 1, request.app.state.options, param="inputs")
    params = data.parameters or TEISimilarityParameters()
    timings, started = Timings(), time.perf_counter()
    scores, tokens = await served.engine.score(
        data.inputs.source_sentence, data.inputs.sentences, prompt_name=params.prompt_name, timings=timings,
        max_tokens=request.app.state.options.max_request_tokens,
        **tei_truncation(params.truncate, params.truncation_direction))
    return Response([float(s) for s in scores], headers=_headers(timings, started, tokens))


def tei_model_type(emb) -> dict:
    """/info's ``model_type`` as TEI writes it: ``classifier`` (more than one label) or ``reranker`` (one) with
    ``id2label`` and ``label2id``, else ``embedding`` with its pooling."""
    if "classify" in emb.tasks:
        labels = emb.labels
        kind = "reranker" if len(labels) == 1 else "classifier"
        return {kind: {"id2label": {str(i): name for i, name in enumerate(labels)},
                       "label2id": {name: i for i, name in enumerate(labels)}}}
    return {"embedding": {"pooling": emb.card.pooling.value if emb.card.pooling else None}}


class TEIController(Controller):
    tags = ["TEI"]

    @post("/embed", status_code=200, summary="Embeddings (text-embeddings-inference)")
    async def embed(self, request: Request, data: TEIEmbedRequest) -> Response:
        return await tei_embed(request, data)

    @post("/embed_all", status_code=200, summary="Per-token embeddings (text-embeddings-inference)")
    async def embed_all(self, request: Request, data: TEITokensRequest) -> Response:
        served, tokenize, timings, started = _begin(request, data)
        states, tokens = await served.engine.embed_tokens(data.inputs, timings=timings, **tokenize)
        return Response([s.tolist() for s in states], headers=_headers(timings, started, tokens))

    @post("/embed_sparse", status_code=200, summary="Sparse (SPLADE) embeddings (text-embeddings-inference)")
    async def embed_sparse(self, request: Request, data: TEITokensRequest) -> Response:
        return await tei_embed_sparse(request, data)

    @post("/similarity", status_code=200, summary="Cosine similarity of a sentence with others (text-embeddings-inference)")
    async def similarity(self, request: Request, data: TEISimilarityRequest) -> Response:
        return await tei_similarity(request, data)

    @post("/decode", status_code=200, summary="Texts of token ids (text-embeddings-inference)")
    async def decode(self, request: Request, data: TEIDecodeRequest) -> Response:
        request.state.dialect = "tei"
        emb = request.app.state.registry.get(data.model).embedder
        batch = data.ids if data.ids and isinstance(data.ids[0], list) else [data.ids]
        if not batch or not all(batch):
            raise RequestError("`ids` cannot be empty", param="ids")
        check_limits(len(batch), request.app.state.options, param="ids")
        for i, ids in enumerate(batch):
            emb.tokenizer.from_ids(ids, truncate=-1, index=i)  # integers in the vocabulary, or a 4xx naming one
        return Response([emb.tokenizer.decode(ids, skip_special_tokens=data.skip_special_tokens) for ids in batch])

    @get("/info", summary="Served model info (text-embeddings-inference)")
    async def info(self, request: Request) -> dict:
        request.state.dialect = "tei"
        name, served = next(iter(request.app.state.registry.models.items()))
        emb, options = served.embedder, request.app.state.options
        return {"model_id": name, "model_sha": None, "model_dtype": emb.manifest.precision,
                "model_type": tei_model_type(emb),
                "max_concurrent_requests": options.max_concurrent_requests, "max_input_length": emb.manifest.max_seq_len,
                "max_batch_tokens": emb.options.max_batch_tokens, "max_client_batch_size": options.max_client_batch_size,
                "auto_truncate": emb.options.auto_truncate, "tokenization_workers": 1, "version": "onnx-embed-toolkit 0.1.0"}
