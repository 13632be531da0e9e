"""The image tower's throughput: ``Embedder.embed_images`` vs transformers' image processor +
``get_image_features`` on the same decoded photos."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from toolkit.bench.machine import machine_info, time_calls
from toolkit.settings import default_threads

__all__ = ["bench_images", "synthetic_photos"]


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
                times[name].append(time_calls(engines[name], chunks))
                prep[name].append(time_calls(preprocess[name], chunks))
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

