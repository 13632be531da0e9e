"""Chat-style inputs: render ``messages`` with the model's (or the caller's) Jinja chat template.

Rendering follows Hugging Face's ``apply_chat_template``: a sandboxed Jinja
environment with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``,
the tokenizer's special tokens as variables, and ``continue_final_message``
cutting the text right after the last message's content. Jinja is optional
for serving (``pip install 'onnx-embed-toolkit[chat]'``); without it a chat
request is refused with a message that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from toolkit.errors import RequestError

__all__ = ["render_chat"]


def _raise(message: str):
    raise RequestError(f"chat template: {message}", param="messages")


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RequestError("chat messages need Jinja2 on the server: pip install 'onnx-embed-toolkit[chat]'",
                           param="messages") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise RequestError(f"chat template does not compile: {exc}", param="chat_template") from None


def _check(messages: Sequence[Any]) -> list[dict]:
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({**m, "content": content})
    return out


def render_chat(template: str | None, messages: Sequence[Any], *, special_tokens: Mapping[str, str],
                add_generation_prompt: bool = False, continue_final_message: bool = False,
                chat_template_kwargs: Mapping[str, Any] | None = None, model: str = "this model") -> str:
    """The prompt text for one conversation."""
    if not template:
        raise RequestError(f"model '{model}' has no chat template: send `input`, or give `chat_template`", param="messages")
    if add_generation_prompt and continue_final_message:
        raise RequestError("add_generation_prompt and continue_final_message cannot both be true",
                           param="continue_final_message")
    compiled = _compile(template)
    conversation = _check(messages)
    from jinja2 import TemplateError

    variables = {**special_tokens, **(chat_template_kwargs or {})}
    try:
        text = compiled.render(messages=conversation, add_generation_prompt=add_generation_prompt, **variables)
    except RequestError:
        raise
    except TemplateError as exc:
        raise RequestError(f"chat template failed on these messages: {exc}", param="messages") from None
    if continue_final_message:
        final = conversation[-1]["content"].strip()
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise RequestError("continue_final_message: the rendered template does not contain the final message",
                               param="continue_final_message")
        text = text[: cut + len(final)]
    return text
