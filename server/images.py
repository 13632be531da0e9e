"""Image and video URLs of HTTP requests made decodable (the content parts themselves: ``toolkit.server.content``).

An image URL is a ``data:image/...;base64,...`` URI, a video URL a ``data:video/...;base64,...`` URI, or either an
``http(s)`` URL fetched only from hosts the operator allows (``--allow-media-url HOST``: a server that fetches any
URL is an SSRF hole), within a size and a time limit, redirects re-checked against the same list. Anything else
(a file path above all) is refused.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request

from toolkit.errors import RequestError
from toolkit.runtime.images import MAX_IMAGE_BYTES, ImageRef, is_image_uri
from toolkit.runtime.video import MAX_VIDEO_BYTES, VideoRef
from toolkit.settings import ServerOptions

__all__ = ["fetch_media", "host_allowed"]

_FETCH_CHUNK = 64 * 1024


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


def _fetch(url: str, index: int, options: ServerOptions, what: str) -> bytes:
    opener = urllib.request.build_opener(_CheckedRedirects(options.allow_image_urls))
    request = urllib.request.Request(url, headers={"User-Agent": "onnx-embed-toolkit", "Accept": f"{what}/*"})
    limit = min(options.image_url_max_bytes, MAX_IMAGE_BYTES) if what == "image" else \
        min(options.video_url_max_bytes, MAX_VIDEO_BYTES)
    try:
        with opener.open(request, timeout=options.image_url_timeout_s) as response:
            served = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            other = "video" if what == "image" else "image"
            if served.startswith(f"{other}/"):  # as a data URI of the other kind is refused (read_source)
                article = "an" if what == "image" else "a"
                raise RequestError(f"{what} {index}: {url} is served as {served}, not {article} {what}", param="input")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise RequestError(f"{what} {index}: {url} is {int(declared)} bytes, over the limit of {limit}",
                                   param="input")
            data = bytearray()
            while chunk := response.read(_FETCH_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise RequestError(f"{what} {index}: {url} is over the limit of {limit} bytes", param="input")
            return bytes(data)
    except RequestError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RequestError(f"{what} {index}: cannot fetch {url}: {reason}", param="input") from None


def _needs_fetch(ref, i: int, options: ServerOptions) -> str | None:
    """The URL to fetch for an image or video reference; None where it is already decodable (bytes, a data URI of
    its kind, a runtime ``Video``); RequestError for anything else, or a host the operator has not allowed."""
    what = "video" if isinstance(ref, VideoRef) else "image"
    if what == "image" and (not isinstance(ref, ImageRef) or is_image_uri(ref.source)):
        return None
    url = ref.source
    if what == "video" and isinstance(url, str) and url[:11].lower() == "data:video/":
        return None
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise RequestError(f"{what} {i}: a {what} must be a data:{what}/...;base64 URI or an http(s) URL",
                           param="input")
    if not host_allowed(url, options.allow_image_urls):
        raise RequestError(f"{what} {i}: fetching {urllib.parse.urlsplit(url).hostname} is not allowed on this "
                           f"server; send the {what} as a data:{what}/...;base64 URI (the operator can allow hosts "
                           "with --allow-media-url)", param="input")
    return url


async def fetch_media(items: list, options: ServerOptions) -> list:
    """``items`` with every image and video URL made decodable (those inside ``Multimodal`` items too): data URIs
    kept, allowed http(s) URLs fetched (concurrently, each within the time and size limits), anything else
    refused naming the item."""
    from toolkit.runtime.vision_language import Multimodal

    jobs: dict[tuple[int, str, int], asyncio.Future] = {}
    out = list(items)
    for i, item in enumerate(items):
        parts = {"images": item.images, "videos": item.videos} if isinstance(item, Multimodal) else {"images": [item]}
        for field, refs in parts.items():
            for k, ref in enumerate(refs):
                url = _needs_fetch(ref, i, options)
                if url is not None:
                    what = "video" if field == "videos" else "image"
                    jobs[i, field, k] = asyncio.ensure_future(asyncio.to_thread(_fetch, url, i, options, what))
    try:
        for (i, field, k), job in jobs.items():
            data = await job
            if not isinstance(out[i], Multimodal):
                out[i] = ImageRef(data)
                continue
            item = out[i]
            parts = {"images": list(item.images), "videos": list(item.videos)}
            parts[field][k] = VideoRef(data) if field == "videos" else ImageRef(data)
            out[i] = Multimodal(item.text, parts["images"], parts["videos"])
    finally:
        for job in jobs.values():
            job.cancel()
    return out
