"""A request's inputs: its plain ``input`` / ``prompt``, or chat ``messages`` rendered with a chat template."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from toolkit.errors import RequestError
from toolkit.server.content import has_image_parts
from toolkit.settings import ServerOptions

__all__ = ["RENDER_TIMEOUT_S", "ChatRequest", "prompt_or_chat"]

RENDER_TIMEOUT_S = 5.0  # a chat template must render within this


class ChatRequest(msgspec.Struct, kw_only=True):
    """vLLM's chat fields, shared by the requests that take ``messages`` instead of a plain input."""

    messages: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # default: True for a plain input, False for messages (the template adds them)


async def prompt_or_chat(embedder, data: ChatRequest, plain: Any, field: str, options: ServerOptions) -> tuple[Any, bool]:
    """A request's plain input (``plain``, the field named ``field``) or its chat ``messages`` rendered with
    the chat template, and ``add_special_tokens`` resolved: by default True for plain input, False for
    messages (the template writes the special tokens itself, as in vLLM).

    Templates render off the event loop, within RENDER_TIMEOUT_S: the caller's own ``chat_template``, a Jinja
    program accepted only where the operator allows it (``--allow-request-chat-template``), else the server's
    (``--chat-template``), else the model's.
    """
    specials = data.add_special_tokens
    if data.messages is None:
        if plain is None:
            raise RequestError(f"{field} (or messages) is required", param=field)
        return plain, True if specials is None else specials
    if plain is not None:
        raise RequestError(f"give {field} or messages, not both", param="messages")
    if has_image_parts(data.messages):
        raise RequestError("this route takes text only: image content parts are not accepted here (embed images "
                           "with /v1/embeddings or /v2/embed)", param="messages")
    if data.chat_template is not None and not options.allow_request_chat_template:
        raise RequestError("this server renders messages with the model's own chat template only; a request "
                           "chat_template needs --allow-request-chat-template", param="chat_template")
    render = asyncio.to_thread(embedder.render_chat, data.messages,
                               chat_template=data.chat_template or options.chat_template,
                               add_generation_prompt=data.add_generation_prompt,
                               continue_final_message=data.continue_final_message,
                               chat_template_kwargs=data.chat_template_kwargs)
    try:
        text = await asyncio.wait_for(render, timeout=RENDER_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"the chat template did not render within {RENDER_TIMEOUT_S:.0f} s",
                           param="chat_template") from None
    return text, False if specials is None else specials
