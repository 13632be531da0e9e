"""Request-level checks shared by every route: validated choices and size limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from toolkit.errors import RequestError
from toolkit.settings import ServerOptions

__all__ = ["PRIORITY_RANGE", "check_choice", "check_limits", "check_priority", "prompt_or_chat"]

PRIORITY_RANGE = (-1000, 1000)  # lower runs first; 0 is the default
RENDER_TIMEOUT_S = 5.0  # a chat template must render within this


def check_choice(value: str, valid: Sequence[str], param: str) -> str:
    if value not in valid:
        raise RequestError(f"{param} '{value}' is not one of: {', '.join(valid)}", param=param)
    return value


def check_limits(n_inputs: int, options: ServerOptions, *, param: str = "input") -> None:
    if n_inputs == 0:
        raise RequestError(f"{param} must not be empty", param=param)
    if n_inputs > options.max_client_batch_size:
        raise RequestError(f"{n_inputs} inputs in one request; the limit is {options.max_client_batch_size}", param=param)



def check_priority(priority: int, options: ServerOptions) -> int:
    """vLLM's ``priority`` (lower runs first), bounded; negative only where the operator allows it."""
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise RequestError(f"priority must be between {lo} and {hi}, got {priority}", param="priority")
    if priority < 0 and not options.allow_priority_boost:
        raise RequestError("priority below 0 (ahead of other requests) is not allowed on this server "
                           "(the operator can allow it with --allow-priority-boost)", param="priority")
    return priority


async def prompt_or_chat(embedder, data, plain: Any, field: str, options: ServerOptions) -> tuple[Any, bool]:
    """A request's plain input (``plain``, the field named ``field``) or its chat ``messages`` rendered with
    the chat template, and ``add_special_tokens`` resolved: by default True for plain input, False for
    messages (the template writes the special tokens itself, as in vLLM).

    Templates render off the event loop, within RENDER_TIMEOUT_S; a caller's own ``chat_template`` is a
    Jinja program, accepted only where the operator allows it (``--allow-request-chat-template``).
    """
    specials = data.add_special_tokens
    if data.messages is None:
        if plain is None:
            raise RequestError(f"{field} (or messages) is required", param=field)
        return plain, True if specials is None else specials
    if plain is not None:
        raise RequestError(f"give {field} or messages, not both", param="messages")
    if data.chat_template is not None and not options.allow_request_chat_template:
        raise RequestError("this server renders messages with the model's own chat template only; a request "
                           "chat_template needs --allow-request-chat-template", param="chat_template")
    render = asyncio.to_thread(embedder.render_chat, data.messages, chat_template=data.chat_template,
                               add_generation_prompt=data.add_generation_prompt,
                               continue_final_message=data.continue_final_message,
                               chat_template_kwargs=data.chat_template_kwargs)
    try:
        text = await asyncio.wait_for(render, timeout=RENDER_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"the chat template did not render within {RENDER_TIMEOUT_S:.0f} s",
                           param="chat_template") from None
    return text, False if specials is None else specials
