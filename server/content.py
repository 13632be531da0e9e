"""A request's content, in every peer's dialect, as one list of inputs, and the one place that routes them by
modality: the dialects only parse (texts stay ``str``, images become ``ImageRef``); ``admit_content`` checks
each input's modality against the artifact's encoders and resolves what must be fetched.

Accepted shapes (an item with text and images, or several images, is a ``Multimodal`` item: vision-language
artifacts embed it as one; for CLIP / SigLIP, which read a text OR an image per item, it is a 400 that says so):

- vLLM's chat-style ``messages``: content parts ``{"type": "image_url", "image_url": {"url": ...}}``,
  ``{"type": "video_url", "video_url": {"url": ...}}`` (Qwen3-VL) and ``{"type": "text", "text": ...}`` - the
  whole conversation is one item;
- SGLang's ``input: [{"text": ...}, {"image": ...}, {"video": ...}]`` - one item each;
- infinity's ``"modality": "image"`` with ``input`` a list of image URLs;
- Cohere's ``images`` and ``inputs[].content`` parts, ``image_url`` an object ``{"url": ...}`` or a bare string.
"""

from __future__ import annotations

from typing import Any

from toolkit.errors import RequestError
from toolkit.runtime.encoders import declared_modality
from toolkit.runtime.images import ImageRef
from toolkit.runtime.video import VideoRef
from toolkit.runtime.vision_language import Chat, Multimodal
from toolkit.server.images import fetch_media
from toolkit.settings import ServerOptions

__all__ = ["admit_content", "chat_item", "content_item", "renders_chat_items", "has_image_parts", "image_url", "image_urls", "message_item", "messages_are_content",
           "sglang_items"]

_IMAGE_PARTS = ("image_url", "image")  # content-part types that carry an image
_VIDEO_PARTS = ("video_url", "video")  # and a video (Qwen3-VL)


# ---------------------------------------------------------------- parsing (no model checks)
def image_url(part: Any, where: str, key: str = "image_url") -> str:
    """The URL of an ``image_url`` (or ``video_url``) content part: ``{"url": ...}`` (OpenAI, Cohere's reference)
    or a bare string (as some of Cohere's cloud partners send it)."""
    value = part.get(key) if isinstance(part, dict) else None
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        kind = key.split("_")[0]
        raise RequestError(f"{where}: {key} must be {{'url': 'data:{kind}/...;base64,...'}} or a URL string",
                           param="input")
    return value


def content_part(part: Any, where: str, param: str) -> tuple[str, str]:
    """One content part as ("text", its text), ("image", its URL) or ("video", its URL); RequestError (pointing at
    ``param``) naming the accepted shapes otherwise."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return "text", part["text"]
    if kind in _IMAGE_PARTS:
        return "image", image_url(part, where) if kind == "image_url" else _string(part.get("image"), where)
    if kind in _VIDEO_PARTS:
        return "video", (image_url(part, where, "video_url") if kind == "video_url"
                         else _string(part.get("video"), where, "video"))
    raise RequestError(f"{where}: content parts must be {{'type': 'text', 'text': ...}}, "
                       "{'type': 'image_url', 'image_url': {'url': ...}} or "
                       "{'type': 'video_url', 'video_url': {'url': ...}}", param=param)


def content_item(parts: list, where: str) -> str | ImageRef | Multimodal:
    """Text parts joined by a space, or the one image, or a ``Multimodal`` item of the images and the text."""
    found: dict[str, list[str]] = {"text": [], "image": [], "video": []}
    for part in parts:
        kind, value = content_part(part, where, "input")
        found[kind].append(value)
    texts, images, videos = found["text"], found["image"], found["video"]
    if videos:
        return Multimodal(" ".join(texts) or None, [ImageRef(u) for u in images], [VideoRef(u) for u in videos])
    if (texts and images) or len(images) > 1:
        return Multimodal(" ".join(texts) or None, [ImageRef(u) for u in images])
    if images:
        return ImageRef(images[0])
    if not texts:
        raise RequestError(f"{where} has no content", param="input")
    return " ".join(texts)


def _string(value: Any, where: str, kind: str = "image") -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: an {kind} must be a URL string (data:{kind}/...;base64,...)", param="input")
    return value


def image_urls(value: Any, field: str) -> list[ImageRef]:
    """A URL or a list of URLs that are images by declaration (infinity's ``modality``, Cohere's ``images``)."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise RequestError(f"{field} must be an image URL (data:image/...;base64,...) or a list of them", param=field)
    return [ImageRef(u) for u in urls]


def has_image_parts(messages: list) -> bool:
    """Whether any chat message has an image content part."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS + _VIDEO_PARTS for p in m["content"])
               for m in messages)


def renders_chat_items(embedder) -> bool:
    """Whether the artifact renders conversations itself (its multimodal encoder builds its own model inputs: a
    vision-language artifact), as its manifest declares."""
    encoder = embedder.encoders.get("multimodal")
    return encoder is not None and encoder.builds_inputs


def messages_are_content(messages: list, embedder) -> bool:
    """Whether chat ``messages`` are one content item (they carry an image part, or the artifact reads more than
    text) rather than a conversation for the chat template."""
    return has_image_parts(messages) or tuple(embedder.modalities) != ("text",)


def message_item(messages: list) -> str | ImageRef | Multimodal:
    """vLLM's chat ``messages`` as ONE item: their content parts together."""
    parts: list = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            parts.extend(content)
        else:
            raise RequestError(f"messages[{i}] must have a content string or list", param="messages")
    return content_item(parts, "messages")


def chat_item(messages: list, **flags) -> Chat:
    """vLLM's chat ``messages`` as a conversation to render as the request says (``flags``: ``inputs.chat_flags``):
    each message's role and content kept, its image and video parts as the chat template reads them
    (``{"type": "image"}`` / ``{"type": "video"}``), their URLs in order; videos come before images."""
    rendered, images, videos = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{where} must be an object with a string 'role' and 'content'", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where} must have a content string or list", param="messages")
        parts = []
        for part in content:
            kind, value = content_part(part, where, "messages")
            if kind == "text":
                parts.append({"type": "text", "text": value})
                continue
            if kind == "video" and images:
                raise RequestError(f"{where}: a video part after an image part; put the videos first",
                                   param="messages")
            (images if kind == "image" else videos).append(ImageRef(value) if kind == "image" else VideoRef(value))
            parts.append({"type": kind})
        rendered.append({"role": message["role"], "content": parts})
    if not rendered:
        raise RequestError("messages must not be empty", param="messages")
    return Chat(rendered, images, videos, **flags)


def sglang_items(items: list) -> list[str | ImageRef | Multimodal] | None:
    """SGLang's ``input: [{"text": ...}, {"image": ...}, {"text": ..., "image": ...}]`` (and ``"video"``, which
    Qwen3-VL reads); None when ``items`` is not that shape."""
    if not items or not all(isinstance(x, dict) for x in items):
        return None
    out: list[str | ImageRef | Multimodal] = []
    for i, item in enumerate(items):
        text, image, video = item.get("text"), item.get("image"), item.get("video")
        if text is not None and not isinstance(text, str):
            raise RequestError(f"input[{i}].text must be a string", param="input")
        images = [ImageRef(_string(image, f"input[{i}]"))] if image is not None else []
        videos = [VideoRef(_string(video, f"input[{i}]", "video"))] if video is not None else []
        if videos or (text is not None and images):
            out.append(Multimodal(text, images, videos))
        elif images:
            out.append(images[0])
        elif isinstance(text, str):
            out.append(text)
        else:
            raise RequestError(f"input[{i}] must be {{'text': str}}, {{'image': 'data:image/...'}} or "
                               "{'video': 'data:video/...'}", param="input")
    return out


# ---------------------------------------------------------------- routing (the one model check)
async def admit_content(items: list, embedder, options: ServerOptions, field: str = "input") -> list:
    """``items`` checked against the artifact's encoders (a 400 naming the first input of a modality it does not
    read, and the modalities it does) and made runnable: image and video URLs fetched where the operator allows."""
    readable = tuple(embedder.modalities)
    for i, item in enumerate(items):
        modality = declared_modality(item)
        where = field if len(items) == 1 and field == "messages" else f"{field}[{i}]"
        if getattr(item, "videos", ()) and "video" not in readable:
            raise RequestError(f"{where} has a video: this {embedder.kind} artifact reads "
                               f"{' and '.join(m for m in readable if m != 'multimodal')} only (videos: Qwen3-VL "
                               "artifacts)", param=field)
        if modality not in readable:
            if isinstance(item, Multimodal):  # a two-tower model reads one text or one image per item
                raise RequestError(f"{where} mixes text and an image: this model embeds a text or an image per item "
                                   "(send them as separate items)" if item.text else
                                   f"{where} has {len(item.images)} images: one image per item", param=field)
            raise RequestError(f"{where} is {modality} content: this {embedder.kind} artifact reads "
                               f"{' and '.join(readable)} only", param=field)
    return await fetch_media(items, options)
