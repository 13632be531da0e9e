"""OpenAI ``/v1/embeddings`` (with vLLM's extensions) and ``/v1/models``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from msgspec import UNSET, UnsetType

from toolkit.errors import RequestError
from toolkit.runtime.async_embedder import Timings
from toolkit.runtime.encoding import (
    ENCODING_FORMATS,
    to_base64,
)
from toolkit.server.content import (
    admit_content,
    image_urls,
    messages_are_content,
    sglang_items,
)
from toolkit.server.inputs import ChatRequest, messages_item, prompt_or_chat
from toolkit.server.limits import check_choice, check_limits, check_priority
from toolkit.server.metrics import timing_headers
from toolkit.server.outputs import bytes_response, check_row_encoding
from toolkit.server.schema import ListResponse, UsageInfo
from toolkit.settings import ServerOptions

__all__ = ["ModelList", "OpenAIController", "OpenAIEmbeddingRequest", "OpenAIEmbeddingResponse", "create_embeddings"]


class OpenAIEmbeddingRequest(ChatRequest, kw_only=True):
    """OpenAI's embeddings request plus vLLM's extras; unknown keys are ignored."""

    input: str | list[Any] | None = None
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "right"
    embed_dtype: str = "float32"
    endianness: str = "native"
    use_activation: bool | None = None
    normalize: bool | None = None
    request_id: str | None = None
    priority: int = 0
    additional_data: Any = None
    modality: str = "text"  # infinity's: "image" reads `input` as image URLs
    task: str | None = None  # Jina's embeddings API: the task (a prompt name; jina-embeddings-v3: its adapter too)
    prompt_name: str | None = None  # sentence-transformers' name for the same (as TEI's routes take it)


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a float row, or (encoding_format base64) the row's embed_dtype bytes


class OpenAIEmbeddingResponse(ListResponse):
    """OpenAI's embeddings answer; ``usage`` is vLLM's; ``additional_data`` echoes the request's (vLLM)."""

    data: list[Embedding]
    usage: UsageInfo
    additional_data: Any | UnsetType = UNSET


class ServedModelCard(msgspec.Struct):
    """OpenAI's model object with what a client needs to call this one (vLLM's ``root``, ``max_model_len``)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int
    dimensions: int
    matryoshka_dimensions: list[int]
    matryoshka_any: bool
    prompts: dict[str, str]
    pooling: str | None
    normalize: bool
    sparse: bool
    precision: str
    task: Literal["embed", "rerank"]
    modalities: list[str]
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for a base model
    adapters: list[str] = []  # a base model's LoRA adapters, each served under its own name


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ServedModelCard]


async def create_embeddings(request: Request, data: OpenAIEmbeddingRequest) -> Response[OpenAIEmbeddingResponse]:
    """The embeddings route's work (also reached through /invocations); encoding_format bytes / bytes_only
    answer the rows as application/octet-stream instead (documented by ``server.schema``)."""
    started = time.perf_counter()
    options = request.app.state.options
    served = request.app.state.registry.get(data.model)
    check_row_encoding(data.encoding_format, ENCODING_FORMATS, data.embed_dtype, data.endianness)
    check_priority(data.priority, options)
    check_choice(data.modality, ("text", "image"), "modality")
    normalize = data.use_activation if data.use_activation is not None else data.normalize
    timings = Timings()
    if data.task is not None and data.prompt_name is not None and data.task != data.prompt_name:
        raise RequestError(f"task '{data.task}' and prompt_name '{data.prompt_name}' differ; give one", param="task")
    common = {"dimensions": data.dimensions, "normalize": normalize, "priority": data.priority, "timings": timings}
    if (name := data.task if data.task is not None else data.prompt_name) is not None:
        common["prompt_name"] = name
    mixed = content_items(served.embedder, data, options)
    if mixed is not None:  # content of several modalities (two-tower models): each item a text or an image
        check_limits(len(mixed), options)
        mixed = await admit_content(mixed, served.embedder, options, "messages" if data.messages else "input")
        vectors, tokens, _ = await served.engine.embed_mixed(
            mixed, **common, max_tokens=options.max_request_tokens, truncate_prompt_tokens=data.truncate_prompt_tokens,
            truncation_side=data.truncation_side, add_special_tokens=data.add_special_tokens is not False)
    else:
        inputs, add_special_tokens = await prompt_or_chat(served.embedder, data, data.input, "input", options)
        check_limits(len(inputs) if isinstance(inputs, list) else 1, options)
        vectors, tokens = await served.engine.embed(
            inputs, **common, max_tokens=options.max_request_tokens, truncate_prompt_tokens=data.truncate_prompt_tokens,
            truncation_side=data.truncation_side, add_special_tokens=add_special_tokens)
    usage = UsageInfo.of(tokens)
    head = {"id": data.request_id or f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": served.name, "usage": usage}
    headers = timing_headers(timings, started)
    if data.encoding_format in ("bytes", "bytes_only"):
        return bytes_response(vectors, data.encoding_format, data.embed_dtype, data.endianness, head, headers)
    if data.encoding_format == "base64":
        embeddings: list = to_base64(vectors, data.embed_dtype, data.endianness)
    else:
        embeddings = vectors.tolist()
    body = OpenAIEmbeddingResponse(**head, data=[Embedding("embedding", i, e) for i, e in enumerate(embeddings)],
                                   additional_data=UNSET if data.additional_data is None else data.additional_data)
    return Response(body, headers=headers)


def content_items(embedder, data: OpenAIEmbeddingRequest, options: ServerOptions) -> list | None:
    """The request's items when it carries content parts (infinity's modality, vLLM's content parts in messages,
    SGLang's items); None for plain text input or a chat to render, which take the usual path. A vision-language
    artifact's chat that asks to be rendered as given (``ChatRequest.renders_as_given``) is one ``Chat`` item."""
    if data.modality == "image":
        return image_urls(data.input, "input")
    if data.messages is not None:
        if not messages_are_content(data.messages, embedder):
            return None
        if data.input is not None:
            raise RequestError("give input or messages, not both", param="messages")
        return [messages_item(embedder, data, options)]
    return sglang_items(data.input) if isinstance(data.input, list) else None


class OpenAIController(Controller):
    path = "/v1"
    tags = ["OpenAI"]

    @post("/embeddings", status_code=200, summary="Create embeddings (OpenAI, with vLLM extensions)")
    async def embeddings(self, request: Request, data: OpenAIEmbeddingRequest) -> Response[OpenAIEmbeddingResponse]:
        return await create_embeddings(request, data)

    @get("/models", summary="List served models (OpenAI), with dimensions, Matryoshka sizes, max length and prompts")
    async def models(self, request: Request) -> ModelList:
        data = []
        for name, served in request.app.state.registry.models.items():
            emb = served.embedder
            card = emb.card
            adapter = emb.adapters.get(served.engine.adapter) if served.engine.adapter else None
            root = str(adapter.path) if adapter else card.source or card.name  # vLLM: an adapter's root is its path
            data.append(ServedModelCard(
                id=name, object="model", created=request.app.state.started, owned_by="onnx-embed-toolkit",
                parent=served.parent, adapters=[] if served.parent else list(emb.adapters),
                root=root, max_model_len=emb.manifest.max_seq_len, dimensions=emb.dimensions,
                matryoshka_dimensions=list(card.matryoshka_dims), matryoshka_any=card.matryoshka_any,
                prompts=dict(card.prompts), pooling=card.pooling.value if card.pooling else None,
                normalize=card.normalize, sparse=emb.manifest.sparse, precision=emb.manifest.precision,
                task="rerank" if emb.cross_encoder else "embed", modalities=list(emb.modalities)))
        return ModelList(object="list", data=data)
