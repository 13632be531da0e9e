"""Cohere Embed v2: ``POST /v2/embed``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Controller, Request, Response, post
from msgspec import UNSET, UnsetType

from toolkit.errors import RequestError
from toolkit.runtime.async_embedder import Timings
from toolkit.runtime.encoding import to_base64
from toolkit.server.content import admit_content, content_item, image_urls
from toolkit.server.limits import check_choice, check_limits
from toolkit.server.metrics import timing_headers
from toolkit.server.schema import CohereApiVersion, CohereTokens

__all__ = ["COHERE_INPUT_TYPES", "CohereController", "CohereEmbedRequest", "CohereEmbedResponse"]

# Cohere's input types -> the card prompt names tried, in order
COHERE_INPUT_TYPES = {  # retrieval.query / retrieval.passage / separation: jina-embeddings-v3's task names
    "search_query": ("query", "search_query", "retrieval.query"),
    "search_document": ("document", "passage", "search_document", "retrieval.passage"),
    "classification": ("classification",),
    "clustering": ("clustering", "separation"),
    "image": (),  # images: no prompt
}
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
TRUNCATE = {"END": "right", "START": "left", "NONE": None}


class CohereEmbedRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    texts: list[Any] | None = None
    inputs: list[Any] | None = None
    images: list[Any] | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    output_dimension: int | None = None
    truncate: str = "END"
    max_tokens: int | None = None


class EmbedByType(msgspec.Struct):
    """One list of rows per requested embedding type (only those requested are present)."""

    float_: list[list[float]] | UnsetType = msgspec.field(default=UNSET, name="float")
    int8: list[list[int]] | UnsetType = UNSET
    uint8: list[list[int]] | UnsetType = UNSET
    binary: list[list[int]] | UnsetType = UNSET
    ubinary: list[list[int]] | UnsetType = UNSET
    base64: list[str] | UnsetType = UNSET  # little-endian float32 rows


class CohereEmbedBilledUnits(msgspec.Struct):
    input_tokens: int
    image_tokens: int
    images: int | UnsetType = UNSET


class CohereEmbedMeta(msgspec.Struct):
    api_version: CohereApiVersion
    billed_units: CohereEmbedBilledUnits
    tokens: CohereTokens


class CohereImage(msgspec.Struct):
    width: int
    height: int
    format: str
    bit_depth: int


class CohereEmbedResponse(msgspec.Struct):
    """Cohere's ``embeddings_by_type`` answer: ``texts`` echoes a text request, ``images`` describes an image one."""

    id: str
    embeddings: EmbedByType
    response_type: Literal["embeddings_by_type"]
    meta: CohereEmbedMeta
    texts: list[str] | UnsetType = UNSET
    images: list[CohereImage] | UnsetType = UNSET


def _items(data: CohereEmbedRequest) -> tuple[list, str]:
    """The request's inputs: ``texts``, ``images`` (data URIs) or ``inputs`` (content parts; for CLIP / SigLIP each
    input is a text or an image), exactly one of them, and its field; images come back as ``ImageRef``."""
    given = [name for name in ("texts", "images", "inputs") if getattr(data, name) is not None]
    if len(given) != 1:
        raise RequestError("give exactly one of texts, images or inputs" + (f" (got {', '.join(given)})" if given else ""))
    if data.texts is not None:
        if not all(isinstance(t, str) for t in data.texts):
            raise RequestError("texts must be a list of strings", param="texts")
        return data.texts, "texts"
    if data.images is not None:
        return image_urls(data.images, "images"), "images"
    items = []
    for i, item in enumerate(data.inputs or []):
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(content, list):
            raise RequestError(f"inputs[{i}] must be an object with a content list", param="inputs")
        items.append(content_item(content, f"inputs[{i}]"))
    return items, "inputs"


def _prompt_name(input_type: str | None, prompts: dict[str, str]) -> str | None:
    if input_type is None:
        return None
    if input_type in prompts:
        return input_type
    if input_type not in COHERE_INPUT_TYPES:
        valid = sorted({*COHERE_INPUT_TYPES, *prompts})
        raise RequestError(f"input_type '{input_type}' is not one of: {', '.join(valid)}", param="input_type")
    return next((name for name in COHERE_INPUT_TYPES[input_type] if name in prompts), None)


class CohereController(Controller):
    path = "/v2"
    tags = ["Cohere"]

    @post("/embed", status_code=200, summary="Embed (Cohere v2)")
    async def embed(self, request: Request, data: CohereEmbedRequest) -> Response[CohereEmbedResponse]:
        started = time.perf_counter()
        served = request.app.state.registry.get(data.model)
        emb = served.embedder
        items, field = _items(data)
        options = request.app.state.options
        check_limits(len(items), options, param="texts")
        types = data.embedding_types or ["float"]
        for kind in types:
            check_choice(kind, EMBEDDING_TYPES, "embedding_types")
        check_choice(data.truncate, tuple(TRUNCATE), "truncate")
        side = TRUNCATE[data.truncate]
        if data.max_tokens is not None and data.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1", param="max_tokens")
        max_tokens = None if data.max_tokens is None else min(data.max_tokens, emb.manifest.max_seq_len)  # Cohere: a cap
        truncate = max_tokens if max_tokens is not None else (False if side is None else -1)  # NONE: refuse
        timings = Timings()
        items = await admit_content(items, emb, options, field)
        vectors, tokens, images = await served.engine.embed_mixed(
            items, dimensions=data.output_dimension, normalize=True, timings=timings,
            max_tokens=options.max_request_tokens, prompt_name=_prompt_name(data.input_type, emb.card.prompts),
            truncate_prompt_tokens=truncate, truncation_side=side or "right")
        image_tokens = sum(len(p) for p in images)
        embeddings = EmbedByType()
        for kind in dict.fromkeys(types):
            match kind:
                case "float":
                    embeddings.float_ = vectors.tolist()
                case "base64":
                    embeddings.base64 = to_base64(vectors, "float32", "little")
                case _:
                    setattr(embeddings, kind, np.asarray(emb.quantize(vectors, kind)).tolist())
        billed = CohereEmbedBilledUnits(input_tokens=tokens - image_tokens, image_tokens=image_tokens,
                                        images=len(images) if images else UNSET)
        meta = CohereEmbedMeta(api_version=CohereApiVersion("2"), billed_units=billed,
                               tokens=CohereTokens(input_tokens=tokens - image_tokens))
        body = CohereEmbedResponse(id=str(uuid.uuid4()), embeddings=embeddings, response_type="embeddings_by_type",
                                   meta=meta, texts=items if all(isinstance(x, str) for x in items) else UNSET)
        if images:  # Cohere's image metadata: the images as they came
            body.images = [CohereImage(width=p.width, height=p.height, format=p.format, bit_depth=8) for p in images]
        return Response(body, headers=timing_headers(timings, started))
