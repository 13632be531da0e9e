"""A server under load: N keep-alive connections from a minimal asyncio HTTP/1.1 client (it shares the
server's cores: httpx in threads took ~0.4 of a core at 130 req/s), count- and time-bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from toolkit.bench.machine import machine_info
from toolkit.corpus import load_corpus
from toolkit.errors import ConfigError

__all__ = ["bench_server"]


class _Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the load generator shares the
    server's cores, so it must cost as little CPU as possible (httpx in threads took ~0.4 of a
    core at 130 req/s here)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        import asyncio

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readline()
        if not status_line.startswith(b"HTTP/"):
            raise ConnectionError("the server closed the connection")
        length, close, chunked = 0, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value == "close":
                close = True
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
        if chunked:
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        else:
            await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


TOOLKIT_BODY = {"encoding_format": "base64", "truncate_prompt_tokens": -1}  # what `toolkit bench --server` sends


def bench_server(url: str, *, artifact: Path | None, corpus: Path | None, concurrency: tuple[int, ...], requests: int,
                 inputs_per_request: int, threads: int | None, api_key: str | None = None,
                 route: str = "/v1/embeddings", body_fields: dict | None = None) -> dict:
    """Bounded load (count and time) against a loopback server: ``clients`` connections, each
    sending its next request when the previous answer is in.

    Each request POSTs ``{"input": [...], **body_fields}`` to ``route``; ``body_fields`` defaults to the
    toolkit's (``TOOLKIT_BODY``). Another project's server takes OpenAI's plain body, e.g.
    ``{"model": NAME, "encoding_format": "base64"}``, on its own route (infinity: ``/embeddings``).

    ConfigError when the warm-up request or any measured request is not answered 200: a run
    whose requests fail is an error, not a result (a 401 is fast).
    """
    import asyncio
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise ConfigError(f"--server must be a loopback address (127.0.0.1 / localhost), got {host}")
    texts = load_corpus(corpus, limit=max(requests * inputs_per_request, 64))
    api_key = api_key or os.environ.get("TOOLKIT_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    fields = TOOLKIT_BODY if body_fields is None else body_fields
    bodies = [json.dumps({"input": [texts[(i * inputs_per_request + j) % len(texts)] for j in range(inputs_per_request)],
                          **fields}).encode() for i in range(requests)]

    async def level(clients: int) -> tuple[list[float], int, float, int]:
        deadline = time.monotonic() + 300
        latencies: list[float] = []
        errors = first_error = 0

        async def client(k: int) -> None:
            nonlocal errors, first_error
            conn = _Connection(host, port, headers)
            try:
                for i in range(k, requests, clients):
                    if time.monotonic() > deadline:
                        break
                    start = time.perf_counter()
                    try:
                        status = await conn.post(route, bodies[i])
                    except (OSError, asyncio.IncompleteReadError, ValueError):
                        status = 0
                        await conn.close()
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        errors += 1
                        first_error = first_error or status
            finally:
                await conn.close()

        warm = _Connection(host, port, headers)
        try:
            status = await warm.post(route, bodies[0])
        finally:
            await warm.close()
        if status != 200:
            hint = ": pass --api-key (or TOOLKIT_API_KEY)" if status == 401 else ""
            raise ConfigError(f"the server answered {status} to the warm-up request{hint}")
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return latencies, errors, time.perf_counter() - start, first_error

    rows = []
    for clients in concurrency:
        latencies, errors, wall, first_error = asyncio.run(level(clients))
        if errors:
            raise ConfigError(f"{errors} of {len(latencies)} requests failed at {clients} clients "
                              f"(first status {first_error}); no figures reported")
        ms = np.array(latencies) * 1e3
        rows.append({"concurrency": clients, "requests": len(latencies), "errors": errors,
                     "requests_per_s": len(latencies) / wall, "sentences_per_s": len(latencies) * inputs_per_request / wall,
                     "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                     "p99_ms": float(np.percentile(ms, 99))})
    result = {"mode": "server", "url": url, "route": route, "body_fields": fields, "inputs_per_request": inputs_per_request,
              "machine": machine_info(), "rows": rows}
    if artifact is not None:
        from toolkit.runtime import Embedder

        emb = Embedder(artifact, device="auto", intra_op_threads=threads)
        sample = texts[: min(len(texts), requests * inputs_per_request, 1024)]  # the texts the server got
        emb.embed(sample[:32], truncate_prompt_tokens=-1)
        inproc = {}
        for bs in (1, 32):
            chunks = [sample[i:i + bs] for i in range(0, len(sample), bs)]
            calls = []
            for chunk in chunks:
                start = time.perf_counter()
                emb.embed(chunk, truncate_prompt_tokens=-1)
                calls.append(time.perf_counter() - start)
            inproc[bs] = {"sentences_per_s": sum(map(len, chunks)) / sum(calls), "ms_per_call": float(np.mean(calls)) * 1e3,
                          "p50_ms": float(np.median(calls)) * 1e3}
        result["in_process"] = inproc
        for row in rows:
            row["ratio_vs_inprocess_bs32"] = row["sentences_per_s"] / inproc[32]["sentences_per_s"]
            row["p50_vs_inprocess_bs1"] = row["p50_ms"] / inproc[1]["p50_ms"]
    return result

