"""vLLM's ``/pooling`` (every pooling task the artifact has) and llama.cpp's native ``/embedding``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Controller, Request, post

from toolkit.errors import RequestError
from toolkit.runtime.encoding import to_base64
from toolkit.runtime.pooling import count_inputs
from toolkit.server.limits import check_choice, check_limits
from toolkit.server.schema import UsageInfo

__all__ = ["LlamaEmbedding", "PoolingController", "PoolingResponse", "pooling_tasks"]

TASKS = ("embed", "token_embed", "classify", "token_classify")


class PoolingRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    task: str | None = None  # default: embed
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "right"
    use_activation: bool | None = None  # embed: normalize or not (vLLM's flag)


class LlamaEmbeddingRequest(msgspec.Struct, kw_only=True):
    content: str | list[Any] | None = None
    input: str | list[Any] | None = None  # newer llama.cpp servers accept `input` too
    model: str | None = None


class PoolingData(msgspec.Struct):
    index: int
    object: Literal["pooling"]
    # embed / classify: a row; token_embed: a row per token; encoding_format base64: float32 bytes
    # (one union: msgspec allows one array type in a union)
    data: list[float | list[float]] | str


class PoolingResponse(msgspec.Struct):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class LlamaEmbedding(msgspec.Struct):
    index: int
    embedding: list[list[float]]  # one vector (pooled)


def pooling_tasks(embedder) -> tuple[str, ...]:
    """vLLM's pooling tasks that an artifact answers (``Embedder.tasks``): a sparse (SPLADE) artifact's ``embed``
    is its vocabulary-sized vector; cross-encoders ``classify`` (their labels' scores)."""
    own = {"embed": "embed", "embed_sparse": "embed", "token_embed": "token_embed", "classify": "classify"}
    return tuple(dict.fromkeys(own[t] for t in embedder.tasks if t in own))


class PoolingController(Controller):
    tags = ["vLLM extras"]

    @post("/pooling", status_code=200, summary="vLLM's pooling API: embed or token_embed, as the artifact allows")
    async def pooling(self, request: Request, data: PoolingRequest) -> PoolingResponse:
        served = request.app.state.registry.get(data.model)
        emb, options = served.embedder, request.app.state.options
        task = data.task or "embed"
        check_choice(task, TASKS, "task")
        applicable = pooling_tasks(emb)
        if task not in applicable:
            raise RequestError(f"task '{task}' does not apply to this model; applicable: {', '.join(applicable)}",
                               param="task")
        check_choice(data.encoding_format, ("float", "base64"), "encoding_format")
        check_limits(count_inputs(data.input), options)
        tokenize = {"truncate_prompt_tokens": data.truncate_prompt_tokens, "truncation_side": data.truncation_side,
                    "max_tokens": options.max_request_tokens}
        if task == "classify":
            scores, tokens = await served.engine.classify(data.input, use_activation=data.use_activation is not False,
                                                          **tokenize)
            rows = list(scores)
        elif task == "token_embed":
            rows, tokens = await served.engine.embed_tokens(data.input, **tokenize)
        elif "embed" not in emb.tasks:  # SPLADE: its embed is the vocabulary-sized vector
            entries, tokens = await served.engine.embed_sparse(data.input, **tokenize)
            rows = [_dense(idx, val, emb.dimensions) for idx, val in entries]
        else:
            vectors, tokens = await served.engine.embed(data.input, dimensions=data.dimensions,
                                                        normalize=data.use_activation, **tokenize)
            rows = list(vectors)
        encoded = ([to_base64(r.reshape(1, -1))[0] for r in rows] if data.encoding_format == "base64"
                   else [r.tolist() for r in rows])
        return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", object="list", created=int(time.time()),
                               model=served.name, data=[PoolingData(i, "pooling", d) for i, d in enumerate(encoded)],
                               usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens, completion_tokens=0))

    @post("/embedding", status_code=200, summary="llama.cpp's native embedding route (pooled, normalized)")
    async def embedding(self, request: Request, data: LlamaEmbeddingRequest) -> list[LlamaEmbedding]:
        served = request.app.state.registry.get(data.model)
        inputs = data.content if data.content is not None else data.input
        if inputs is None:
            raise RequestError("content (or input) is required", param="content")
        check_limits(1 if isinstance(inputs, str) else len(inputs), request.app.state.options, param="content")
        vectors, _ = await served.engine.embed(inputs, max_tokens=request.app.state.options.max_request_tokens)
        # llama.cpp answers a list of {index, embedding}, each embedding a list of vectors (one when pooled)
        return [LlamaEmbedding(i, [v.tolist()]) for i, v in enumerate(vectors)]


def _dense(indices: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    row = np.zeros(size, dtype=np.float32)
    row[indices] = values
    return row
