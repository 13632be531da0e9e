"""Chat-style inputs: render ``messages`` with the model's (or the caller's) Jinja chat template.

Rendering follows Hugging Face's ``apply_chat_template``: a sandboxed Jinja
environment with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``,
the tokenizer's special tokens as variables, and ``continue_final_message``
cutting the text right after the last message's content. Jinja is optional
for serving (``pip install 'onnx-embed-toolkit[chat]'``); without it a chat
request is refused with a message that says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from toolkit.errors import RequestError
from toolkit.model_source import install_hint

__all__ = ["MAX_OUTPUT_CHARS", "MAX_RENDER_S", "render_chat"]

# Limits on one render, whoever wrote the template: output size, `*` / `**` on sequences and numbers,
# `range` iterations (nested ones included) and time (checked per output chunk and per range step).
MAX_OUTPUT_CHARS = 1_000_000
MAX_RANGE_STEPS = 1_000_000
MAX_RENDER_S = 4.0
_budget = threading.local()


def _spend() -> None:
    _budget.steps -= 1
    if _budget.steps < 0 or (_budget.steps % 1024 == 0 and time.monotonic() > _budget.deadline):
        raise RequestError("chat template: too much work (range loops or render time past their limits)",
                           param="chat_template")


def _limited_range(*args):
    for i in range(*args):
        _spend()
        yield i


def _raise(message: str, param: str = "messages"):
    raise RequestError(f"chat template: {message}", param=param)


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RequestError(f"chat messages need Jinja2 on the server, the [chat] extra: {install_hint('chat')}",
                           param="messages") from None
    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and (abs(right) > 64 if isinstance(right, (int, float)) else True):
                _raise("`**` with an exponent past 64 is not allowed", "chat_template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                        _raise(f"repeating a sequence past {MAX_OUTPUT_CHARS} items is not allowed", "chat_template")
            return super().call_binop(context, operator, left, right)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["range"] = _limited_range
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise RequestError(f"chat template does not compile: {exc}", param="chat_template") from None


def load_template(value: str) -> str:
    """vLLM's ``--chat-template``: a Jinja file, or the template itself; it must compile (ConfigError otherwise)."""
    from pathlib import Path

    from toolkit.errors import ConfigError

    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ConfigError(f"--chat-template: no file '{value}' (give a Jinja file, or the template itself)")
    try:
        _compile(text)
    except RequestError as exc:
        raise ConfigError(f"--chat-template: {exc.message}") from None
    return text


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
                chat_template_kwargs: Mapping[str, Any] | None = None, model: str = "this model",
                keep_parts: bool = False) -> str:
    """The prompt text for one conversation (``keep_parts``: the messages' content parts go to the template as
    they are, images included, for a caller that built them itself: a vision-language prompt)."""
    if not template:
        raise RequestError(f"model '{model}' has no chat template: send `input`, or give `chat_template`", param="messages")
    if add_generation_prompt and continue_final_message:
        raise RequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
    compiled = _compile(template)
    conversation = list(messages) if keep_parts else _check(messages)
    from jinja2 import TemplateError

    variables = {**special_tokens, **(chat_template_kwargs or {})}
    _budget.steps, _budget.deadline = MAX_RANGE_STEPS, time.monotonic() + MAX_RENDER_S
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(messages=conversation, add_generation_prompt=add_generation_prompt, **variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                _raise(f"the rendered prompt is longer than {MAX_OUTPUT_CHARS} characters", "chat_template")
            _spend()
            chunks.append(chunk)
        text = "".join(chunks)
    except RequestError:
        raise
    except TemplateError as exc:
        raise RequestError(f"chat template failed on these messages: {exc}", param="messages") from None
    if continue_final_message:
        final = conversation[-1]["content"]
        if isinstance(final, list):  # content parts: the last text part is what continues (transformers' rule)
            final = next((part.get("text", "") for part in reversed(final) if "text" in part), "")
        final = final.strip()
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise RequestError("continue_final_message: the rendered template does not contain the final message",
                               param="continue_final_message")
        text = text[: cut + len(final)]
    return text
