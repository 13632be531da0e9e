"""vLLM's ``/pooling`` (every pooling task the artifact has) and llama.cpp's native ``/embedding``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Controller, Request, Response, post

from toolkit.errors import RequestError
from toolkit.runtime.encoding import ENCODING_FORMATS, to_base64
from toolkit.runtime.pooling import count_inputs
from toolkit.runtime.tasks import TASKS as TASK_TABLE
from toolkit.server.content import admit_content, has_image_parts, message_item
from toolkit.server.inputs import ChatRequest, prompt_or_chat
from toolkit.server.limits import check_limits
from toolkit.server.outputs import bytes_response, check_row_encoding
from toolkit.server.schema import ListResponse, UsageInfo

__all__ = ["LlamaEmbedding", "PoolingController", "PoolingResponse", "pooling_tasks"]

VLLM_TASKS = ("embed", "token_embed", "classify", "token_classify")


class PoolingRequest(ChatRequest, kw_only=True):
    """vLLM's pooling request: ``input``, or chat ``messages`` rendered with the chat template (one item)."""

    input: str | list[Any] | None = None
    model: str | None = None
    task: str | None = None  # default: embed
    encoding_format: str = "float"  # float | base64 | bytes | bytes_only (vLLM's)
    embed_dtype: str = "float32"  # base64 / bytes rows: float32, float16, bfloat16, fp8_e4m3, fp8_e5m2
    endianness: str = "native"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "right"
    use_activation: bool | None = None  # embed: normalize or not (vLLM's flag)
    is_query: bool | None = None  # token_embed of a late-interaction (ColBERT) artifact: query mode (default document)


class LlamaEmbeddingRequest(msgspec.Struct, kw_only=True):
    content: str | list[Any] | None = None
    input: str | list[Any] | None = None  # newer llama.cpp servers accept `input` too
    model: str | None = None


class PoolingData(msgspec.Struct, omit_defaults=True):
    index: int
    object: Literal["pooling"]
    # embed / classify: a row; token_embed: a row per token; encoding_format base64: the rows' bytes in embed_dtype
    # (one union: msgspec allows one array type in a union)
    data: list[float | list[float]] | str
    # base64 only (not in vLLM's answer): the array's shape, e.g. [tokens, 128] for a token_embed matrix, so a
    # client reads a 300-token document's vectors from one string instead of 38,400 JSON numbers
    shape: list[int] | None = None


class PoolingResponse(ListResponse):
    data: list[PoolingData]
    usage: UsageInfo


class LlamaEmbedding(msgspec.Struct):
    index: int
    embedding: list[list[float]]  # one vector (pooled)


_ALIASES = {"embed_sparse": "embed"}  # vLLM's /pooling `embed` of a sparse (SPLADE) model: its vocabulary-sized vector


def _pooling_entries(embedder) -> dict[str, str]:
    """/pooling's task names for this artifact -> the task table's entries: every text task with a row per input
    that the artifact answers, under vLLM's name where it has one."""
    names: dict[str, str] = {}
    for name, task in TASK_TABLE.items():
        if task.rows is not None and task.modality == "text" and task.applies(embedder.context):
            names.setdefault(_ALIASES.get(name, name), name)
    return names


def reads_pages(embedder) -> bool:
    """A multi-vector vision-language artifact (ColQwen2): it renders every item with its processor's prompts."""
    return embedder.context.late_interaction is not None and "image" in embedder.modalities


def pooling_tasks(embedder) -> tuple[str, ...]:
    """The tasks /pooling answers for this artifact (vLLM's: embed, token_embed, classify; and any other text
    task of the table with a row per input)."""
    return tuple(_pooling_entries(embedder))


class PoolingController(Controller):
    tags = ["vLLM extras"]

    @post("/pooling", status_code=200, summary="vLLM's pooling API: every task of the artifact with a row per input")
    async def pooling(self, request: Request, data: PoolingRequest) -> Response[PoolingResponse]:
        served = request.app.state.registry.get(data.model)
        emb, options = served.embedder, request.app.state.options
        task = data.task or "embed"
        entries = _pooling_entries(emb)
        if task not in entries:  # vLLM's words, then what applies (an unknown name and a task of another kind alike)
            raise RequestError(f"Unsupported task: '{task}' (this model answers: {', '.join(entries)}; vLLM's tasks: "
                               f"{', '.join(VLLM_TASKS)})", param="task")
        check_row_encoding(data.encoding_format, ENCODING_FORMATS, data.embed_dtype, data.endianness)
        if data.messages is not None and (has_image_parts(data.messages) or reads_pages(emb)):
            if data.input is not None:
                raise RequestError("give input or messages, not both", param="messages")
            # vLLM's form for an image (ColQwen2's pages): the messages' content parts as ONE item, rendered by the
            # artifact itself (a page prompt, a query prefix), never by the chat template
            inputs, specials = await admit_content([message_item(data.messages)], emb, options, "messages"), True
        else:
            inputs, specials = await prompt_or_chat(emb, data, data.input, "input", options)
        check_limits(count_inputs(inputs), options)
        name = entries[task]
        params = {"truncate_prompt_tokens": data.truncate_prompt_tokens, "truncation_side": data.truncation_side,
                  "add_special_tokens": specials,
                  **{"embed": {"dimensions": data.dimensions, "normalize": data.use_activation},
                     "classify": {"use_activation": data.use_activation is not False},
                     "token_embed": {"is_query": data.is_query}}.get(name, {})}
        result, prepared = await served.engine.perform(name, inputs, max_tokens=options.max_request_tokens, **params)
        rows, tokens = TASK_TABLE[name].rows(emb.context, result), prepared.tokens
        head = {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": served.name,
                "usage": UsageInfo.of(tokens)}
        if data.encoding_format in ("bytes", "bytes_only"):
            return bytes_response(rows, data.encoding_format, data.embed_dtype, data.endianness, head, {})
        if data.encoding_format == "base64":
            items = [PoolingData(i, "pooling", to_base64(np.asarray(r, np.float32).reshape(1, -1), data.embed_dtype,
                                                         data.endianness)[0], list(np.shape(r)))
                     for i, r in enumerate(rows)]
        else:
            items = [PoolingData(i, "pooling", np.asarray(r).tolist()) for i, r in enumerate(rows)]
        return Response(PoolingResponse(**head, data=items))

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
