"""Step 5: verify the ONNX artifact against the PyTorch reference.

The artifact runs through the real runtime (``Embedder``: its tokenizer,
padding and batching); the reference runs each input alone, unpadded, through
the torch module, and (for sentence-transformers layouts) through
sentence-transformers itself on the raw texts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.corpus import load_corpus
from toolkit.export.graph import EmbeddingModule
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ParityCase, ParityReport
from toolkit.runtime.embedder import Embedder
from toolkit.runtime.tokenization import Tokenized

__all__ = ["THRESHOLDS", "check_parity", "cosines", "neighbour_overlap", "retrieval_overlap"]

THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
_PROBE_CAP = 512  # longest probe, in tokens, whatever the model's maximum


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na < 1e-9) & (nb < 1e-9)
    cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-18)
    return np.where(both_zero, 1.0, cos)


def _probe_texts(max_len: int) -> dict[str, str]:
    corpus = load_corpus(limit=400)
    short = min(corpus, key=len)
    medium = sorted(corpus, key=len)[len(corpus) * 3 // 4]
    long = " ".join(corpus[:200])  # well past any max length: exercises truncation
    return {"short": short, "medium": medium, "max": long, "short2": corpus[1]}


def _reference(module: EmbeddingModule, item: Tokenized, uses_types: bool) -> list[np.ndarray]:
    ids = torch.tensor([item.ids], dtype=torch.int64)
    args = [ids, torch.ones_like(ids)]
    if uses_types:
        args.append(torch.tensor([item.type_ids or [0] * len(item.ids)], dtype=torch.int64))
    with torch.no_grad():
        return [o[0].float().numpy() for o in module(*args)]


def check_parity(artifact: Path, resolved: ResolvedModel, module: EmbeddingModule, precision: str) -> ParityReport:
    """Min cosine per output over batch sizes 1 and 4, short / medium / max lengths, padded and unpadded."""
    # fp16 artifacts are checked where they will run (the GPU when there is one); the rest on the CPU
    emb = Embedder(artifact, device="auto" if precision == "fp16" else "cpu")
    outputs = emb.session.output_names
    cap = min(emb.manifest.max_seq_len, _PROBE_CAP)
    probes = _probe_texts(cap)
    batches = {
        "b1-short": ["short"], "b1-medium": ["medium"], "b1-max": ["max"],
        "b4-padded": ["short", "medium", "max", "short2"], "b4-unpadded": ["medium"] * 4,
    }
    cases: list[ParityCase] = []
    worst: dict[str, float] = {}
    for keys in batches.values():
        items = emb.tokenize_inputs([probes[k] for k in keys], truncate_prompt_tokens=cap)
        got = emb.run_batch(items, outputs)
        refs = [_reference(module, item, resolved.arch.token_type_ids) for item in items]
        for o, output in enumerate(outputs):
            cos_min, diff_max = 1.0, 0.0
            for row, (item, ref) in enumerate(zip(items, refs)):
                value = got[o][row]
                if output == "token_embeddings":
                    value = emb._unpad(value, len(item))
                cos_min = min(cos_min, float(cosines(value, ref[o]).min()))
                diff_max = max(diff_max, float(np.abs(value - ref[o]).max()))
            worst[output] = min(worst.get(output, 1.0), cos_min)
            cases.append(ParityCase(output=output, batch=len(items), seq_len=max(len(t) for t in items),
                                    padded=len({len(t) for t in items}) > 1, padding_side=str(emb.card.padding_side.value),
                                    min_cosine=cos_min, max_abs_diff=diff_max))
    reference = "torch"
    if resolved.st_layout and not emb.manifest.sparse:
        reference = "sentence-transformers"
        st_cos = _sentence_transformers_check(resolved, emb, [probes[k] for k in ("short", "medium", "max", "short2")], cap)
        worst["sentence_embedding"] = min(worst["sentence_embedding"], st_cos)
        cases.append(ParityCase(output="sentence_embedding (sentence-transformers)", batch=4, seq_len=cap, padded=True,
                                padding_side=str(emb.card.padding_side.value), min_cosine=st_cos, max_abs_diff=-1.0))
    threshold = THRESHOLDS[precision]
    passed = all(v >= threshold for v in worst.values())
    return ParityReport(reference=reference, threshold=threshold, min_cosine=worst, cases=cases, passed=passed)


def _sentence_transformers_check(resolved: ResolvedModel, emb: Embedder, texts: list[str], cap: int) -> float:
    """sentence-transformers' own encode() on the raw texts vs the artifact."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolved.model_dir), device="cpu")
    st.max_seq_length = cap
    st.tokenizer.padding_side = emb.card.padding_side.value
    ref = st.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    got = emb.embed(texts, truncate_prompt_tokens=cap)
    return float(cosines(got, ref).min())


def neighbour_overlap(a: np.ndarray, b: np.ndarray, *, k: int = 10) -> float:
    """Mean overlap of each text's top-k neighbours (itself excluded) under two sets of unit vectors."""
    overlap = []
    for i, (sims_a, sims_b) in enumerate(zip(a @ a.T, b @ b.T)):
        sims_a[i] = sims_b[i] = -np.inf
        top_a = set(np.argpartition(-sims_a, k)[:k])
        top_b = set(np.argpartition(-sims_b, k)[:k])
        overlap.append(len(top_a & top_b) / k)
    return float(np.mean(overlap))


def retrieval_overlap(candidate: Embedder, reference: Embedder, *, n: int = 500, k: int = 10) -> tuple[float, float]:
    """(mean top-k neighbour overlap, min cosine) of ``candidate`` vs ``reference`` on the probe corpus."""
    texts = load_corpus(limit=n)
    a = candidate.embed(texts, truncate_prompt_tokens=-1, normalize=True)
    b = reference.embed(texts, truncate_prompt_tokens=-1, normalize=True)
    return neighbour_overlap(a, b, k=k), float(cosines(a, b).min())
