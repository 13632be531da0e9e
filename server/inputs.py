"""A request's inputs: its plain ``input`` / ``prompt``, or chat ``messages`` rendered with a chat template."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from toolkit.errors import RequestError
from toolkit.server.content import chat_item, has_image_parts, message_item, renders_chat_items
from toolkit.settings import ServerOptions

__all__ = ["RENDER_TIMEOUT_S", "ChatRequest", "chat_flags", "messages_item", "prompt_or_chat"]

RENDER_TIMEOUT_S = 5.0  # a chat template must render within this


class ChatRequest(msgspec.Struct, kw_only=True):
    """vLLM's chat fields, shared by the requests that take ``messages`` instead of a plain input."""

    messages: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | UnsetType = UNSET  # default False (vLLM's); whether it was given matters below
    continue_final_message: bool | UnsetType = UNSET  # default False
    add_special_tokens: bool | None = None  # default: True for a plain input, False for messages (the template adds them)

    def renders_as_given(self) -> bool:
        """Whether the request asks for its conversation to be rendered as it is (vLLM's chat embeddings): it sets
        a chat flag or template, or holds a message of its own other than the user's (a system message). Otherwise
        a vision-language artifact reads its messages' content as one plain item, by the card's convention."""
        flags = (self.add_generation_prompt, self.continue_final_message)
        return (any(flag is not UNSET for flag in flags) or self.chat_template is not None
                or self.chat_template_kwargs is not None
                or any(not isinstance(m, dict) or m.get("role") != "user" for m in self.messages or ()))


def chat_flags(data: ChatRequest, options: ServerOptions) -> dict[str, Any]:
    """The request's chat rendering: its template (the caller's own only where the operator allows it, with
    ``--allow-request-chat-template``; else the server's ``--chat-template``; else the model's, None here) and its
    flags, defaults filled in."""
    if data.chat_template is not None and not options.allow_request_chat_template:
        raise RequestError("this server renders messages with the model's own chat template only; a request "
                           "chat_template needs --allow-request-chat-template", param="chat_template")
    return {"chat_template": data.chat_template or options.chat_template,
            "add_generation_prompt": data.add_generation_prompt is True,
            "continue_final_message": data.continue_final_message is True,
            "chat_template_kwargs": data.chat_template_kwargs}


def messages_item(embedder, data: ChatRequest, options: ServerOptions):
    """A request's ``messages`` as ONE content item: on a vision-language artifact, a ``Chat`` rendered as the
    request says where it asks for that (``ChatRequest.renders_as_given``); otherwise their content parts
    together, a plain item (the card's prompt convention, as Cohere content and SGLang items)."""
    if renders_chat_items(embedder) and data.renders_as_given():
        return chat_item(data.messages, **chat_flags(data, options))
    return message_item(data.messages)


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
    render = asyncio.to_thread(embedder.render_chat, data.messages, **chat_flags(data, options))
    try:
        text = await asyncio.wait_for(render, timeout=RENDER_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"the chat template did not render within {RENDER_TIMEOUT_S:.0f} s",
                           param="chat_template") from None
    return text, False if specials is None else specials
