"""vLLM-style extras: ``/v1/score`` (and ``/score``), ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import numpy as np
from litestar import Controller, Request, post

from toolkit.errors import RequestError
from toolkit.server.limits import check_limits, prompt_or_chat

__all__ = ["VLLMController"]


class ScoreRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class VLLMController(Controller):
    tags = ["vLLM extras"]

    @post(["/v1/score", "/score"], status_code=200, summary="Cosine scores of text_1 against text_2 (1-1, 1-N, N-N)")
    async def score(self, request: Request, data: ScoreRequest) -> dict:
        served = request.app.state.registry.get(data.model)
        left = [data.text_1] if isinstance(data.text_1, str) else data.text_1
        right = [data.text_2] if isinstance(data.text_2, str) else data.text_2
        check_limits(len(left) + len(right), request.app.state.options, param="text_2")
        if not left or not right:
            raise RequestError("text_1 and text_2 must not be empty", param="text_1")
        if len(left) not in (1, len(right)):
            raise RequestError(f"text_1 has {len(left)} inputs and text_2 {len(right)}: give 1 or {len(right)}", param="text_1")
        vectors, tokens = await served.engine.embed(left + right, normalize=True,
                                                    max_tokens=request.app.state.options.max_request_tokens,
                                                    truncate_prompt_tokens=data.truncate_prompt_tokens)
        a, b = vectors[: len(left)], vectors[len(left):]
        scores = (a * b).sum(-1) if len(left) > 1 else b @ a[0]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": served.name,
                "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(np.atleast_1d(scores))],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @post("/tokenize", status_code=200, summary="Token ids of a prompt")
    async def tokenize(self, request: Request, data: TokenizeRequest) -> dict:
        served = request.app.state.registry.get(data.model)
        emb = served.embedder
        prompt, specials = prompt_or_chat(emb, data, data.prompt, "prompt")
        ids = emb.tokenizer.ids(prompt, add_special_tokens=specials)
        body = {"count": len(ids), "max_model_len": emb.manifest.max_seq_len, "tokens": ids}
        if data.return_token_strs:
            body["token_strs"] = emb.tokenizer.token_strings(ids)
        return body

    @post("/detokenize", status_code=200, summary="Text of token ids")
    async def detokenize(self, request: Request, data: DetokenizeRequest) -> dict:
        served = request.app.state.registry.get(data.model)
        return {"prompt": served.embedder.detokenize(data.tokens)}
