"""OpenAI ``/v1/embeddings`` (with vLLM's extensions) and ``/v1/models``."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post

from toolkit.runtime.async_embedder import Timings
from toolkit.runtime.encoding import EMBED_DTYPES, ENDIANNESS, to_base64, to_bytes
from toolkit.server.limits import check_choice, check_limits, prompt_or_chat

__all__ = ["OpenAIController", "OpenAIEmbeddingRequest"]


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """OpenAI's embeddings request plus vLLM's extras; unknown keys are ignored."""

    input: str | list[Any] | None = None
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "right"
    add_special_tokens: bool | None = None  # default: True for input, False for messages (the template adds them)
    embed_dtype: str = "float32"
    endianness: str = "native"
    use_activation: bool | None = None
    normalize: bool | None = None
    request_id: str | None = None
    priority: int = 0
    additional_data: Any = None
    messages: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False


def timing_headers(t: Timings, started: float) -> dict[str, str]:
    """TEI-style timing headers, milliseconds."""
    return {"x-total-time": f"{(time.perf_counter() - started) * 1e3:.2f}", "x-tokenization-time": f"{t.tokenize * 1e3:.2f}",
            "x-queue-time": f"{t.queue * 1e3:.2f}", "x-inference-time": f"{t.inference * 1e3:.2f}"}


class OpenAIController(Controller):
    path = "/v1"
    tags = ["OpenAI"]

    @post("/embeddings", status_code=200, summary="Create embeddings (OpenAI, with vLLM extensions)")
    async def embeddings(self, request: Request, data: OpenAIEmbeddingRequest) -> Response:
        started = time.perf_counter()
        served = request.app.state.registry.get(data.model)
        inputs, add_special_tokens = prompt_or_chat(served.embedder, data, data.input, "input")
        check_choice(data.encoding_format, ("float", "base64", "bytes"), "encoding_format")
        check_choice(data.embed_dtype, EMBED_DTYPES, "embed_dtype")
        check_choice(data.endianness, ENDIANNESS, "endianness")
        check_limits(len(inputs) if isinstance(inputs, list) else 1, request.app.state.options)
        timings = Timings()
        vectors, tokens = await served.engine.embed(
            inputs, dimensions=data.dimensions,
            normalize=data.use_activation if data.use_activation is not None else data.normalize,
            priority=data.priority, timings=timings, max_tokens=request.app.state.options.max_request_tokens,
            truncate_prompt_tokens=data.truncate_prompt_tokens, truncation_side=data.truncation_side,
            add_special_tokens=add_special_tokens)
        request.app.state.metrics.phases(served.name, timings.tokenize, timings.queue, timings.inference, tokens)
        head = {"id": data.request_id or f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        headers = timing_headers(timings, started)
        if data.encoding_format == "bytes":
            width = vectors.shape[1] * {"float32": 4, "float16": 2, "bfloat16": 2}[data.embed_dtype]
            meta = {**head, "embed_dtype": data.embed_dtype, "endianness": data.endianness, "shape": list(vectors.shape),
                    "data": [{"index": i, "start": i * width, "end": (i + 1) * width} for i in range(len(vectors))]}
            headers["metadata"] = msgspec.json.encode(meta).decode()
            return Response(to_bytes(vectors, data.embed_dtype, data.endianness), media_type="application/octet-stream", headers=headers)
        if data.encoding_format == "base64":
            embeddings: list = to_base64(vectors, data.embed_dtype, data.endianness)
        else:
            embeddings = vectors.tolist()
        body = {**head, "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]}
        if data.additional_data is not None:
            body["additional_data"] = data.additional_data
        return Response(body, headers=headers)

    @get("/models", summary="List served models (OpenAI), with dimensions, Matryoshka sizes, max length and prompts")
    async def models(self, request: Request) -> dict:
        data = []
        for name, served in request.app.state.registry.models.items():
            emb = served.embedder
            card = emb.card
            data.append({"id": name, "object": "model", "created": request.app.state.started, "owned_by": "onnx-embed-toolkit",
                         "root": card.source or card.name, "max_model_len": emb.manifest.max_seq_len,
                         "dimensions": emb.dimensions, "matryoshka_dimensions": card.matryoshka_dims,
                         "matryoshka_any": card.matryoshka_any, "prompts": card.prompts,
                         "pooling": card.pooling.value if card.pooling else None, "normalize": card.normalize,
                         "sparse": emb.manifest.sparse, "precision": emb.manifest.precision})
        return {"object": "list", "data": data}
