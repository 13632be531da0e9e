"""vLLM-style extras: ``/v1/score`` (and ``/score``), ``/tokenize``, ``/detokenize``, ``/tokenizer_info``,
and SageMaker's ``/invocations`` (dispatched by the body's fields, as vLLM does)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from msgspec import UNSET, UnsetType

from toolkit.errors import RequestError
from toolkit.runtime.pooling import score_pairs
from toolkit.runtime.tokenization import INLINE_CHARS
from toolkit.server.content import admit_content, content_item, renders_chat_items
from toolkit.server.inputs import ChatRequest, messages_item, prompt_or_chat
from toolkit.server.limits import check_limits
from toolkit.server.schema import ListResponse, UsageInfo

__all__ = ["DetokenizeRequest", "DetokenizeResponse", "ScoreRequest", "ScoreResponse", "TokenizeRequest", "TokenizeResponse",
           "TokenizerInfo", "VLLMController", "create_score", "create_text", "create_tokens"]



class ScoreRequest(msgspec.Struct, kw_only=True):
    """vLLM's score request: ``queries`` with ``documents`` (or ``items``), or the older ``data_1``/``data_2``
    and ``text_1``/``text_2``."""

    model: str | None = None
    # each side: a text, a list of texts, or vLLM's multimodal forms (images: ColQwen2 pages, two-tower artifacts):
    # a list whose items may be {"content": [parts]} (one input each), or one {"content": [parts]} (a part each)
    queries: str | list[Any] | dict[str, Any] | None = None
    documents: str | list[Any] | dict[str, Any] | None = None
    items: str | list[Any] | dict[str, Any] | None = None
    data_1: str | list[Any] | dict[str, Any] | None = None
    data_2: str | list[Any] | dict[str, Any] | None = None
    text_1: str | list[Any] | dict[str, Any] | None = None
    text_2: str | list[Any] | dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None

    def pair(self) -> tuple[Any, Any]:
        for first, second in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
                              ("text_1", "text_2")):
            left, right = getattr(self, first), getattr(self, second)
            if left is not None and right is not None:
                return score_side(left, first), score_side(right, second)
        raise RequestError("give queries and documents (or queries/items, data_1/data_2, text_1/text_2)",
                           param="queries")


def score_side(value: Any, field: str) -> str | list:
    """One side of a score request as the engine reads it: texts as given, vLLM's ``{"content": [parts]}`` as
    content items (``server.content``: an image becomes an ``ImageRef``); anything else a 400 naming ``field``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        parts = value.get("content")
        if not isinstance(parts, list) or not parts:
            raise RequestError(f"{field} must be a string, a list, or {{'content': [parts]}}", param=field)
        return [content_item([part], f"{field}.content[{i}]") for i, part in enumerate(parts)]
    side = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            side.append(item)
        elif isinstance(item, dict) and isinstance(item.get("content"), list):
            side.append(content_item(item["content"], f"{field}[{i}]"))
        else:
            raise RequestError(f"{field}[{i}] must be a string or {{'content': [parts]}}", param=field)
    return side


class TokenizeRequest(ChatRequest, kw_only=True):
    """vLLM's tokenize request; with ``inputs`` instead of ``prompt`` it is TEI's (answered in TEI's shape)."""

    model: str | None = None
    prompt: str | None = None
    inputs: str | list[str] | None = None  # TEI's body
    prompt_name: str | None = None  # TEI's
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class Score(msgspec.Struct):
    index: int
    object: Literal["score"]
    score: float


class ScoreResponse(ListResponse):
    data: list[Score]
    usage: UsageInfo


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None  # with return_token_strs


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class TokenizerInfo(msgspec.Struct):
    """vLLM's tokenizer_info: the tokenizer's configuration and the special tokens it has."""

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    pad_token_id: int
    padding_side: str
    truncation_side: str
    chat_template: str | None
    bos_token: str | UnsetType = UNSET
    eos_token: str | UnsetType = UNSET
    unk_token: str | UnsetType = UNSET
    sep_token: str | UnsetType = UNSET
    pad_token: str | UnsetType = UNSET
    cls_token: str | UnsetType = UNSET
    mask_token: str | UnsetType = UNSET


async def create_score(request: Request, data: ScoreRequest) -> ScoreResponse:
    served = request.app.state.registry.get(data.model)
    left, right = score_pairs(*data.pair())
    check_limits(len(left) + len(right), request.app.state.options, param="documents")
    options = request.app.state.options
    if any(not isinstance(x, str) for x in left):  # images: checked and fetched as the embed routes do
        left = await admit_content(left, served.embedder, options, "queries")
    if any(not isinstance(x, str) for x in right):
        right = await admit_content(right, served.embedder, options, "documents")
    scores, tokens = await served.engine.score(left, right, use_activation=data.use_activation,
                                               max_tokens=request.app.state.options.max_request_tokens,
                                               truncate_prompt_tokens=data.truncate_prompt_tokens)
    return ScoreResponse(id=f"score-{uuid.uuid4().hex}", object="list", created=int(time.time()), model=served.name,
                         data=[Score(i, "score", float(s)) for i, s in enumerate(scores)],
                         usage=UsageInfo.of(tokens))


async def create_tokens(request: Request, data: TokenizeRequest) -> TokenizeResponse:
    if data.inputs is not None:
        return await _tei_tokens(request, data)
    served = request.app.state.registry.get(data.model)
    emb = served.embedder
    options = request.app.state.options
    if data.messages is not None and renders_chat_items(emb):  # the tokens /v1/embeddings embeds for these messages
        if data.prompt is not None:
            raise RequestError("give prompt or messages, not both", param="messages")
        items = await admit_content([messages_item(emb, data, options)], emb, options, "messages")
        (built,), _ = await asyncio.to_thread(emb.encoder("multimodal").model_inputs, items)
        if len(built.ids) > options.max_request_tokens:
            raise RequestError(f"the request has {len(built.ids)} tokens; the limit is {options.max_request_tokens}",
                               param="messages")
        return TokenizeResponse(count=len(built.ids), max_model_len=emb.manifest.max_seq_len, tokens=built.ids,
                                token_strs=emb.tokenizer.token_strings(built.ids) if data.return_token_strs else None)
    prompt, specials = await prompt_or_chat(emb, data, data.prompt, "prompt", options)
    limit = options.max_request_tokens
    if len(prompt) <= INLINE_CHARS:  # longer prompts tokenize in a thread
        ids = emb.tokenizer.ids(prompt, specials, limit)
    else:  # off the event loop, and no further than the server's tokens per request
        ids = await asyncio.to_thread(emb.tokenizer.ids, prompt, specials, limit)
    return TokenizeResponse(count=len(ids), max_model_len=emb.manifest.max_seq_len, tokens=ids,
                            token_strs=emb.tokenizer.token_strings(ids) if data.return_token_strs else None)


async def _tei_tokens(request: Request, data: TokenizeRequest) -> Response:
    """TEI's ``/tokenize``: ``[[{"id", "text", "special", "start", "stop"}, ...], ...]``, a list per input (one
    for a single string), offsets in UTF-8 bytes of the prompt-prefixed text."""
    request.state.dialect = "tei"
    if data.prompt is not None or data.messages is not None:
        raise RequestError("give inputs (TEI) or prompt / messages (vLLM), not both", param="inputs")
    emb = request.app.state.registry.get(data.model).embedder
    texts = [data.inputs] if isinstance(data.inputs, str) else data.inputs
    if not texts:
        raise RequestError("`inputs` cannot be empty", param="inputs")
    check_limits(len(texts), request.app.state.options, param="inputs")
    prefix = emb.prompt_text(data.prompt_name, None)
    specials = data.add_special_tokens is not False
    limit = request.app.state.options.max_request_tokens
    spans = await asyncio.to_thread(lambda: [emb.tokenizer.spans(prefix + t, specials, limit) for t in texts])
    return Response(spans)


async def create_text(request: Request, data: DetokenizeRequest) -> DetokenizeResponse:
    served = request.app.state.registry.get(data.model)
    return DetokenizeResponse(prompt=served.embedder.detokenize(data.tokens))


class VLLMController(Controller):
    tags = ["vLLM extras"]

    @post(["/v1/score", "/score"], status_code=200,
          summary="Scores of queries against documents (1-1, 1-N, N-N): a cross-encoder's pair scores, or cosines "
                  "of embeddings; vLLM's field names")
    async def score(self, request: Request, data: ScoreRequest) -> ScoreResponse:
        return await create_score(request, data)

    @post("/tokenize", status_code=200, summary="Token ids of a prompt or chat messages (vLLM); with `inputs`, TEI's "
                                                 "token list per input")
    async def tokenize(self, request: Request, data: TokenizeRequest) -> TokenizeResponse:
        return await create_tokens(request, data)

    @post("/detokenize", status_code=200, summary="Text of token ids")
    async def detokenize(self, request: Request, data: DetokenizeRequest) -> DetokenizeResponse:
        return await create_text(request, data)

    @get("/tokenizer_info", summary="The served tokenizer's configuration (vLLM)")
    async def tokenizer_info(self, request: Request, model: str | None = None) -> TokenizerInfo:
        emb = request.app.state.registry.get(model).embedder
        manifest = emb.manifest
        return msgspec.convert({  # unknown special-token names are dropped, not a 500
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": manifest.max_seq_len,
            "vocab_size": emb.tokenizer.vocab_size, "pad_token_id": manifest.pad_token_id,
            "padding_side": emb.card.padding_side.value, "truncation_side": "right",
            **manifest.special_tokens,
            "chat_template": request.app.state.options.chat_template or manifest.chat_template}, TokenizerInfo)
