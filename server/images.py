"""Image URLs of HTTP requests made decodable (the content parts themselves: ``toolkit.server.content``).

An image URL is a ``data:image/...;base64,...`` URI, or an ``http(s)`` URL fetched only from hosts the operator
allows (``--allow-image-url HOST``: a server that fetches any URL is an SSRF hole), within a size and a time
limit, redirects re-checked against the same list. Anything else (a file path above all) is refused.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request

from toolkit.errors import RequestError
from toolkit.runtime.images import MAX_IMAGE_BYTES, ImageRef, is_image_uri
from toolkit.settings import ServerOptions

__all__ = ["fetch_images", "host_allowed"]

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
    """``items`` with every image URL made decodable (those inside ``Multimodal`` items too): data URIs kept,
    allowed http(s) URLs fetched (concurrently, each within the time and size limits), anything else refused
    naming the item."""
    from toolkit.runtime.vision_language import Multimodal

    jobs: dict[tuple[int, int], asyncio.Future] = {}
    out = list(items)
    for i, item in enumerate(items):
        refs = item.images if isinstance(item, Multimodal) else [item]
        for k, ref in enumerate(refs):
            if not isinstance(ref, ImageRef) or is_image_uri(ref.source):
                continue
            url = ref.source
            if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
                raise RequestError(f"image {i}: an image must be a data:image/...;base64 URI or an http(s) URL",
                                   param="input")
            if not host_allowed(url, options.allow_image_urls):
                raise RequestError(f"image {i}: fetching {urllib.parse.urlsplit(url).hostname} is not allowed on "
                                   "this server; send the image as a data:image/...;base64 URI (the operator can "
                                   "allow hosts with --allow-image-url)", param="input")
            jobs[i, k] = asyncio.ensure_future(asyncio.to_thread(_fetch, url, i, options))
    try:
        for (i, k), job in jobs.items():
            fetched = ImageRef(await job)
            if isinstance(out[i], Multimodal):
                out[i] = Multimodal(out[i].text, [fetched if j == k else ref for j, ref in enumerate(out[i].images)])
            else:
                out[i] = fetched
    finally:
        for job in jobs.values():
            job.cancel()
    return out
