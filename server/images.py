"""Image inputs of HTTP requests, in every peer's dialect, turned into one list of texts and ``ImageRef`` images.

Accepted shapes (for CLIP / SigLIP each item is a text OR an image; an item with both is a 400 that says so):

- vLLM's chat-style ``messages``: content parts ``{"type": "image_url", "image_url": {"url": ...}}`` and
  ``{"type": "text", "text": ...}`` - the whole conversation is one item;
- SGLang's ``input: [{"text": ...}, {"image": ...}]`` - one item each;
- infinity's ``"modality": "image"`` with ``input`` a list of image URLs;
- Cohere's ``images`` and ``inputs[].content`` parts, ``image_url`` an object ``{"url": ...}`` or a bare string.

An image URL is a ``data:image/...;base64,...`` URI, or an ``http(s)`` URL fetched only from hosts the operator
allows (``--allow-image-url HOST``: a server that fetches any URL is an SSRF hole), within a size and a time
limit, redirects re-checked against the same list. Anything else (a file path above all) is refused.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from toolkit.errors import RequestError
from toolkit.runtime.images import MAX_IMAGE_BYTES, ImageRef, is_image_uri
from toolkit.settings import ServerOptions

__all__ = ["content_item", "fetch_images", "has_image_parts", "host_allowed", "image_url", "message_item", "sglang_items"]

_FETCH_CHUNK = 64 * 1024
_IMAGE_PARTS = ("image_url", "image")  # content-part types that carry an image


def image_url(part: Any, where: str) -> str:
    """The URL of an ``image_url`` content part: ``{"url": ...}`` (OpenAI, Cohere's reference) or a bare string
    (as some of Cohere's cloud partners send it)."""
    value = part.get("image_url") if isinstance(part, dict) else None
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: image_url must be {{'url': 'data:image/...;base64,...'}} or a URL string",
                           param="input")
    return value


def content_item(parts: list, where: str) -> str | ImageRef:
    """Text parts joined by a space, or the one image; both kinds at once, or two images, is a 400."""
    texts: list[str] = []
    images: list[str] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _IMAGE_PARTS:
            images.append(image_url(part, where) if kind == "image_url" else _string(part.get("image"), where))
        else:
            raise RequestError(f"{where}: content parts must be {{'type': 'text', 'text': ...}} or "
                               "{'type': 'image_url', 'image_url': {'url': ...}}", param="input")
    if texts and images:
        raise RequestError(f"{where} mixes text and an image: this model embeds a text or an image per item "
                           "(send them as separate items)", param="input")
    if len(images) > 1:
        raise RequestError(f"{where} has {len(images)} images: one image per item", param="input")
    if images:
        return ImageRef(images[0])
    if not texts:
        raise RequestError(f"{where} has no content", param="input")
    return " ".join(texts)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: an image must be a URL string (data:image/...;base64,...)", param="input")
    return value


def has_image_parts(messages: list) -> bool:
    """Whether any chat message has an image content part."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS for p in m["content"])
               for m in messages)


def message_item(messages: list, image_tower: bool) -> str | ImageRef | None:
    """vLLM's chat ``messages`` for a two-tower model: their content parts as ONE item. None for a text-only model
    whose messages have no image part (the chat-template path then applies as before)."""
    if not image_tower and not has_image_parts(messages):
        return None
    if not image_tower:
        raise RequestError("this model embeds text only: image content parts are not accepted", param="messages")
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


def sglang_items(items: list, image_tower: bool) -> list[str | ImageRef] | None:
    """SGLang's ``input: [{"text": ...}, {"image": ...}]``; None when ``items`` is not that shape."""
    if not items or not all(isinstance(x, dict) for x in items):
        return None
    if not image_tower:
        raise RequestError("this model embeds text only: input items of the form {'text': ..., 'image': ...} "
                           "are for image models", param="input")
    out: list[str | ImageRef] = []
    for i, item in enumerate(items):
        text, image = item.get("text"), item.get("image")
        if text is not None and image is not None:
            raise RequestError(f"input[{i}] mixes text and an image: this model embeds a text or an image per item",
                               param="input")
        if image is not None:
            out.append(ImageRef(_string(image, f"input[{i}]")))
        elif isinstance(text, str):
            out.append(text)
        else:
            raise RequestError(f"input[{i}] must be {{'text': str}} or {{'image': 'data:image/...'}}", param="input")
    return out


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether ``url``'s host is on the operator's list: ``host``, ``host:port`` or ``*.domain``."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if entry in (host, f"{host}:{port}"):
            return True
    return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        if not host_allowed(newurl, self.allowed):
            raise urllib.error.URLError(f"redirected to {urllib.parse.urlsplit(newurl).hostname}, not an allowed host")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, index: int, options: ServerOptions) -> bytes:
    opener = urllib.request.build_opener(_CheckedRedirects(options.allow_image_urls))
    request = urllib.request.Request(url, headers={"User-Agent": "onnx-embed-toolkit", "Accept": "image/*"})
    limit = min(options.image_url_max_bytes, MAX_IMAGE_BYTES)
    try:
        with opener.open(request, timeout=options.image_url_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise RequestError(f"image {index}: {url} is {int(declared)} bytes, over the limit of {limit}",
                                   param="input")
            data = bytearray()
            while chunk := response.read(_FETCH_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise RequestError(f"image {index}: {url} is over the limit of {limit} bytes", param="input")
            return bytes(data)
    except RequestError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RequestError(f"image {index}: cannot fetch {url}: {reason}", param="input") from None


async def fetch_images(items: list, options: ServerOptions) -> list:
    """``items`` with every image URL made decodable: data URIs kept, allowed http(s) URLs fetched (concurrently,
    each within the time and size limits), anything else refused naming the item."""
    jobs: dict[int, asyncio.Future] = {}
    out = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, ImageRef):
            continue
        url = item.source
        if is_image_uri(url):
            continue
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise RequestError(f"image {i}: an image must be a data:image/...;base64 URI or an http(s) URL",
                               param="input")
        if not host_allowed(url, options.allow_image_urls):
            raise RequestError(f"image {i}: fetching {urllib.parse.urlsplit(url).hostname} is not allowed on this "
                               "server; send the image as a data:image/...;base64 URI (the operator can allow hosts "
                               "with --allow-image-url)", param="input")
        jobs[i] = asyncio.ensure_future(asyncio.to_thread(_fetch, url, i, options))
    try:
        for i, job in jobs.items():
            out[i] = ImageRef(await job)
    finally:
        for job in jobs.values():
            job.cancel()
    return out
