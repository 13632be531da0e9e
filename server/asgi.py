"""``asgi_call``: one HTTP request answered by an ASGI app in this process, without a socket (the multiplexing
router hands a request to the replica's app; the Batch API answers each line by the online route itself)."""

from __future__ import annotations

import asyncio

__all__ = ["asgi_call"]


async def asgi_call(app, method: str, path: str, *, headers: list, body: bytes, query: bytes = b"", client=None,
                    scope: dict | None = None) -> tuple[int, list, bytes]:
    """(status, headers, body) of one request through ``app``; ``scope``: extra keys of the ASGI scope. The body
    comes whole in one message; a disconnect only once the answer is complete."""
    full = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query, "headers": headers, "client": client, "server": ("127.0.0.1", 80), "state": {},
            "extensions": {}, **(scope or {})}
    delivered, finished = False, asyncio.Event()
    status, out_headers, chunks = 500, [], []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status, out_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                finished.set()

    try:
        await app(full, receive, send)
    finally:
        finished.set()
    return status, out_headers, b"".join(chunks)
