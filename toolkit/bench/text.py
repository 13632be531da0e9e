"""In-process text throughput: the artifact through ``Embedder`` and, side by side, sentence-transformers
on the same model and texts, interleaved in one process."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from toolkit.bench.machine import machine_info, time_calls
from toolkit.corpus import load_corpus
from toolkit.errors import ConfigError
from toolkit.settings import default_threads

__all__ = ["bench_inprocess"]


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


def _measure(engines: dict, chunks: list[list[str]], label: int | str, repeats: int, emb) -> list[dict]:
    """Interleaved repeats of every engine over the same calls; one row per engine."""
    n_sent = sum(len(c) for c in chunks)
    n_tok = sum(len(t) for c in chunks for t in emb.tokenize_inputs(c, truncate_prompt_tokens=-1))
    for fn in engines.values():
        fn(chunks[0][:32])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            times[name].append(time_calls(fn, chunks))
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

