"""Request-level checks shared by every route: validated choices and size limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toolkit.errors import RequestError
from toolkit.settings import ServerOptions

__all__ = ["check_choice", "check_limits", "prompt_or_chat"]


def check_choice(value: str, valid: Sequence[str], param: str) -> str:
    if value not in valid:
        raise RequestError(f"{param} '{value}' is not one of: {', '.join(valid)}", param=param)
    return value


def check_limits(n_inputs: int, options: ServerOptions, *, param: str = "input") -> None:
    if n_inputs == 0:
        raise RequestError(f"{param} must not be empty", param=param)
    if n_inputs > options.max_client_batch_size:
        raise RequestError(f"{n_inputs} inputs in one request; the limit is {options.max_client_batch_size}", param=param)



def prompt_or_chat(embedder, data, plain: Any, field: str) -> tuple[Any, bool]:
    """A request's plain input (``plain``, the field named ``field``) or its chat ``messages`` rendered with
    the chat template, and ``add_special_tokens`` resolved: by default True for plain input, False for
    messages (the template writes the special tokens itself, as in vLLM)."""
    specials = data.add_special_tokens
    if data.messages is None:
        if plain is None:
            raise RequestError(f"{field} (or messages) is required", param=field)
        return plain, True if specials is None else specials
    if plain is not None:
        raise RequestError(f"give {field} or messages, not both", param="messages")
    text = embedder.render_chat(data.messages, chat_template=data.chat_template,
                                add_generation_prompt=data.add_generation_prompt,
                                continue_final_message=data.continue_final_message,
                                chat_template_kwargs=data.chat_template_kwargs)
    return text, False if specials is None else specials
