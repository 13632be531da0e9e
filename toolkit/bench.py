"""``toolkit bench``: in-process throughput side by side with sentence-transformers, or a server under load."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from toolkit.corpus import load_corpus
from toolkit.errors import ConfigError
from toolkit.settings import default_threads

__all__ = ["bench_images", "bench_inprocess", "bench_server", "machine_info", "plot_result", "print_result"]


def machine_info() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx", "avx2")))
    return {"cpu": model, "cores": default_threads(), "isa": isa, "python": platform.python_version()}


def _lengths(emb, texts: list[str]) -> dict:
    n = np.array([len(t) for t in emb.tokenize_inputs(texts, truncate_prompt_tokens=-1)])
    return {"n": int(n.size), "mean": float(n.mean()), "p50": float(np.percentile(n, 50)),
            "p90": float(np.percentile(n, 90)), "max": int(n.max()), "total": int(n.sum())}


def _reference_dir(emb, against: str) -> str:
    if against != "sentence-transformers":
        return against
    from toolkit.export.resolve import DEFAULT_MODEL, default_model_dir

    if emb.card.name == DEFAULT_MODEL:
        return str(default_model_dir())
    if emb.card.source:
        return emb.card.source
    raise ConfigError("cannot tell which model to load in sentence-transformers: pass --against MODEL_DIR")


def _time(fn, chunks) -> float:
    start = time.perf_counter()
    for chunk in chunks:
        fn(chunk)
    return time.perf_counter() - start


def _measure(engines: dict, chunks: list[list[str]], label: int | str, repeats: int, emb) -> list[dict]:
    """Interleaved repeats of every engine over the same calls; one row per engine."""
    n_sent = sum(len(c) for c in chunks)
    n_tok = sum(len(t) for c in chunks for t in emb.tokenize_inputs(c, truncate_prompt_tokens=-1))
    for fn in engines.values():
        fn(chunks[0][:32])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            times[name].append(_time(fn, chunks))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"engine": name, "batch_size": label, "sentences_per_s": n_sent / med, "tokens_per_s": n_tok / med,
                     "ms_per_batch": med / len(chunks) * 1e3, "spread_pct": (max(ts) - min(ts)) / med * 100})
    return rows


def bench_inprocess(artifact: Path, *, corpus: Path | None, batch_sizes: tuple[int, ...], repeats: int, n_texts: int,
                    against: str | None, threads: int | None, offline: bool = True) -> dict:
    """Interleaved repeats of Embedder (and sentence-transformers) over the same texts per batch size.

    Each batch size sends the corpus as calls of that many texts (what a
    client sends); ``offline`` adds one call with the whole corpus.
    """
    from toolkit.runtime import Embedder

    threads = threads or default_threads()
    emb = Embedder(artifact, device="auto", intra_op_threads=threads)
    texts = load_corpus(corpus, limit=n_texts)
    lengths = _lengths(emb, texts)
    st = None
    if against:
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()

        torch.set_num_threads(threads)
        st = SentenceTransformer(_reference_dir(emb, against), device="cuda" if emb.device.value != "cpu" else "cpu")
        if emb.manifest.precision == "fp16" and emb.device.value != "cpu":
            st = st.half()  # fp16 against fp16 on the same GPU
        st.max_seq_length = emb.manifest.max_seq_len
    engines = {"toolkit": lambda c: emb.embed(c, truncate_prompt_tokens=-1)}
    if st is not None:
        engines["sentence-transformers"] = lambda c: st.encode(c, batch_size=len(c), convert_to_numpy=True)
    rows = []
    for bs in batch_sizes:
        chunks = [texts[i:i + bs] for i in range(0, len(texts), bs)]
        if bs == 1:
            chunks = chunks[:128]  # bs1 is latency-bound: fewer calls give a stable median
        rows += _measure(engines, chunks, bs, repeats, emb)
    if offline:
        # the whole corpus in one call: sentence-transformers sorts it by length itself and runs batches of 32;
        # the toolkit plans its own batches. This is each engine's best offline throughput.
        offline_engines = {"toolkit": engines["toolkit"]}
        if st is not None:
            offline_engines["sentence-transformers"] = lambda c: st.encode(c, batch_size=32, convert_to_numpy=True)
        rows += _measure(offline_engines, [texts], "corpus", repeats, emb)
    for row in rows:
        ref = next((r for r in rows if r["engine"] == "sentence-transformers" and r["batch_size"] == row["batch_size"]), None)
        row["ratio_vs_reference"] = row["sentences_per_s"] / ref["sentences_per_s"] if ref else None
    min_cos = None
    if st is not None:
        a = emb.embed(texts, truncate_prompt_tokens=-1, normalize=True)
        b = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        min_cos = float((a * b).sum(-1).min())
    return {"mode": "in-process", "artifact": str(artifact), "model": emb.card.name, "precision": emb.manifest.precision,
            "device": emb.device.value, "threads": threads, "machine": machine_info(), "corpus_tokens": lengths,
            "repeats": repeats, "rows": rows, "min_cosine_vs_reference": min_cos}


def synthetic_photos(n: int, seed: int = 0) -> list:
    """``n`` decoded photo-like images (JPEG at quality 90, then decoded, as a client's uploads would be) of
    the sizes people send: 640x480, 480x640, 1024x768, 800x800, in turn."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (1024, 768), (800, 800)]
    photos = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, ((x // 40 + y // 40) % 2) * 200], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photo = Image.open(io.BytesIO(buffer.getvalue()))
        photo.load()
        photos.append(photo)
    return photos


def bench_images(artifact: Path, *, against: str | None, batch_sizes: tuple[int, ...], repeats: int, n_images: int,
                 threads: int | None) -> dict:
    """Images/s of ``Embedder.embed_images`` vs transformers' image processor + ``get_image_features`` (torch),
    on the same decoded images, interleaved in one process; and each side's preprocessing alone."""
    from toolkit.runtime import Embedder

    threads = threads or default_threads()
    emb = Embedder(artifact, device="auto", intra_op_threads=threads)
    emb.image_spec  # noqa: B018 - a clear error for an artifact without an image tower
    photos = synthetic_photos(n_images)
    engines = {"toolkit": lambda c: emb.embed_images(c)}
    preprocess = {"toolkit": lambda c: emb.load_images(c)}
    reference = None
    if against:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        torch.set_num_threads(threads)
        processor = AutoImageProcessor.from_pretrained(against, backend="pil")
        model = AutoModel.from_pretrained(against, dtype=torch.float32).eval()

        def reference(chunk):
            with torch.inference_mode():
                pixels = processor(images=chunk, return_tensors="pt")["pixel_values"]
                return model.get_image_features(pixel_values=pixels).pooler_output.numpy()

        engines["transformers"] = reference
        preprocess["transformers"] = lambda c: processor(images=c, return_tensors="np")
    rows = []
    for bs in batch_sizes:
        chunks = [photos[i:i + bs] for i in range(0, len(photos), bs)]
        if bs == 1:
            chunks = chunks[:64]
        n = sum(len(c) for c in chunks)
        for fn in engines.values():
            fn(chunks[0])  # warm-up
        times: dict[str, list[float]] = {name: [] for name in engines}
        prep: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name in engines:
                times[name].append(_time(engines[name], chunks))
                prep[name].append(_time(preprocess[name], chunks))
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"engine": name, "batch_size": bs, "images_per_s": n / med, "ms_per_batch": med / len(chunks) * 1e3,
                         "spread_pct": (max(ts) - min(ts)) / med * 100,
                         "preprocess_share": min(1.0, statistics.median(prep[name]) / med)})
    for row in rows:
        ref = next((r for r in rows if r["engine"] == "transformers" and r["batch_size"] == row["batch_size"]), None)
        row["ratio_vs_reference"] = row["images_per_s"] / ref["images_per_s"] if ref else None
    min_cos = None
    if reference is not None:
        a, b = emb.embed_images(photos[:32], normalize=True), reference(photos[:32])
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        min_cos = float((a * b).sum(-1).min())
    return {"mode": "images", "artifact": str(artifact), "model": emb.card.name, "precision": emb.manifest.precision,
            "device": emb.device.value, "threads": threads, "machine": machine_info(), "images": n_images,
            "image_size": [emb.image_spec.height, emb.image_spec.width], "repeats": repeats, "rows": rows,
            "min_cosine_vs_reference": min_cos}


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


def bench_server(url: str, *, artifact: Path | None, corpus: Path | None, concurrency: tuple[int, ...], requests: int,
                 inputs_per_request: int, threads: int | None, api_key: str | None = None) -> dict:
    """Bounded load (count and time) against a loopback server: ``clients`` connections, each
    sending its next request when the previous answer is in.

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
    bodies = [json.dumps({"input": [texts[(i * inputs_per_request + j) % len(texts)] for j in range(inputs_per_request)],
                          "encoding_format": "base64", "truncate_prompt_tokens": -1}).encode() for i in range(requests)]

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
                        status = await conn.post("/v1/embeddings", bodies[i])
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
            status = await warm.post("/v1/embeddings", bodies[0])
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
    result = {"mode": "server", "url": url, "inputs_per_request": inputs_per_request, "machine": machine_info(), "rows": rows}
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


def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    m = result["machine"]
    console.print(f"[bold]{result['mode']}[/] on {m['cpu']} ({m['cores']} cores; {' '.join(m['isa'])})")
    if result["mode"] == "images":
        console.print(f"{result['model']} image tower, {result['precision']} on {result['device']}, {result['threads']} "
                      f"threads; {result['images']} decoded photos (640x480 to 1024x768) -> "
                      f"{result['image_size'][0]}x{result['image_size'][1]}")
        table = Table("engine", "batch", "images/s", "ms/batch", "spread %", "preprocessing share", "ratio vs transformers")
        for r in result["rows"]:
            ratio = f"{r['ratio_vs_reference']:.2f}x" if r["ratio_vs_reference"] else "-"
            table.add_row(r["engine"], str(r["batch_size"]), f"{r['images_per_s']:.1f}", f"{r['ms_per_batch']:.1f}",
                          f"{r['spread_pct']:.1f}", f"{r['preprocess_share'] * 100:.0f}%", ratio)
        console.print(table)
        if result["min_cosine_vs_reference"] is not None:
            console.print(f"min cosine vs transformers: {result['min_cosine_vs_reference']:.7f}")
        return
    if result["mode"] == "in-process":
        t = result["corpus_tokens"]
        console.print(f"{result['model']} {result['precision']} on {result['device']}, {result['threads']} threads; corpus "
                      f"{t['n']} texts, tokens mean {t['mean']:.1f} p50 {t['p50']:.0f} p90 {t['p90']:.0f} max {t['max']}")
        table = Table("engine", "batch", "sentences/s", "tokens/s", "ms/batch", "spread %", "ratio vs ST")
        for r in result["rows"]:
            ratio = f"{r['ratio_vs_reference']:.2f}x" if r["ratio_vs_reference"] else "-"
            table.add_row(r["engine"], str(r["batch_size"]), f"{r['sentences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                          f"{r['ms_per_batch']:.2f}", f"{r['spread_pct']:.1f}", ratio)
        console.print(table)
        if result["min_cosine_vs_reference"] is not None:
            console.print(f"min cosine vs sentence-transformers: {result['min_cosine_vs_reference']:.7f}")
    else:
        table = Table("clients", "requests", "errors", "req/s", "sent/s", "p50 ms", "p95 ms", "p99 ms", "vs in-proc bs32", "p50 vs bs1")
        for r in result["rows"]:
            table.add_row(str(r["concurrency"]), str(r["requests"]), str(r["errors"]), f"{r['requests_per_s']:.1f}",
                          f"{r['sentences_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['p99_ms']:.2f}",
                          f"{r.get('ratio_vs_inprocess_bs32', 0):.2f}", f"{r.get('p50_vs_inprocess_bs1', 0):.2f}")
        console.print(table)
        if "in_process" in result:
            ip = result["in_process"]
            console.print(f"in-process on the same texts: bs1 p50 {ip[1]['p50_ms']:.2f} ms/call, "
                          f"bs32 {ip[32]['sentences_per_s']:.1f} sentences/s")


def plot_result(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if result["mode"] == "in-process":
        for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["engine"] == engine and isinstance(r["batch_size"], int)]
            line, = ax.plot([r["batch_size"] for r in rows], [r["sentences_per_s"] for r in rows], marker="o", label=engine)
            for r in result["rows"]:
                if r["engine"] == engine and r["batch_size"] == "corpus":
                    ax.axhline(r["sentences_per_s"], color=line.get_color(), linestyle="--", alpha=0.7,
                               label=f"{engine}, whole corpus in one call")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"{result['model']} ({result['precision']}, {result['machine']['cores']} cores)")
    else:
        rows = result["rows"]
        ax.plot([r["concurrency"] for r in rows], [r["sentences_per_s"] for r in rows], marker="o", label="server")
        inproc = {int(k): v for k, v in result.get("in_process", {}).items()}  # JSON turns the keys into strings
        for bs, style in ((32, "--"), (1, ":")):
            if bs in inproc:
                ax.axhline(inproc[bs]["sentences_per_s"], color="gray", linestyle=style,
                           label=f"in-process Embedder, calls of {bs}")
        top = max([r["sentences_per_s"] for r in rows] + [v["sentences_per_s"] for v in inproc.values()])
        ax.set_ylim(0, top * 1.12)
        ax.set_xlabel("concurrent clients (one sentence per request)")
        ax.set_title("toolkit serve under load")
    ax.set_ylabel("sentences / s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
