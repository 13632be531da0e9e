"""Step 5: verify the ONNX artifact against the PyTorch reference.

The artifact runs through the real runtime (``Embedder``: its tokenizer,
padding and batching); the reference runs each input alone, unpadded, through
the torch module, and (for sentence-transformers layouts) through
sentence-transformers itself on the raw texts.

The gate: min cosine >= THRESHOLDS[precision] on every output, every case. Deep
models can miss it on per-token outputs through rounding alone: PyTorch's own
fp32 result differs from exact (float64) arithmetic by 1 - cos ~1e-5 at some
positions of a 12-layer, 768-wide model whose attention amplifies noise
(measured on a synthetic MPNet with weights at std 0.2), and ONNX Runtime sums
in another order. So an fp32 output that misses the cosine threshold is judged
against the noise floor instead: its distance from the float64 reference must
stay within NOISE_FACTOR times PyTorch fp32's own distance from it (the same
inputs, per position, the word-embedding table as the artifact stores it). A
wrong graph misses by orders of magnitude; rounding does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.corpus import load_corpus
from toolkit.export.graph import EmbeddingModule
from toolkit.export.precision import PrecisionPlan
from toolkit.export.resolve import ResolvedModel, declared_length
from toolkit.manifest import ParityCase, ParityReport
from toolkit.runtime.embedder import Embedder
from toolkit.runtime.pooling import cosines
from toolkit.runtime.tokenization import Tokenized

__all__ = ["ABS_THRESHOLDS", "THRESHOLDS", "check_parity", "cosines", "neighbour_overlap"]

THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
ABS_THRESHOLDS = {"fp32": 1e-5, "fp16": 2e-2, "int8": 5e-2}  # cross-encoder logits and scores
NOISE_FACTOR = 10.0  # fp32: the artifact may be this many times farther from exact arithmetic than PyTorch fp32
_NOISE_MIN = 1e-9  # a floor under the noise (1 - cosine) so an exact reference does not demand exactness
TOKEN_OUTPUTS = ("token_embeddings", "colbert_embeddings")  # (batch, seq, dim): compared over the real tokens
_PROBE_CAP = 512  # longest probe, in tokens, whatever the model's maximum


def _probe_texts(max_len: int) -> dict[str, str]:
    corpus = load_corpus(limit=400)
    short = min(corpus, key=len)
    medium = sorted(corpus, key=len)[len(corpus) * 3 // 4]
    long = " ".join(corpus[:200])  # well past any max length: exercises truncation
    return {"short": short, "medium": medium, "max": long, "short2": corpus[1]}


def _reference(module: EmbeddingModule, item: Tokenized, uses_types: bool,
               dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    ids = torch.tensor([item.ids], dtype=torch.int64)
    args = [ids, torch.ones_like(ids)]
    if uses_types:
        args.append(torch.tensor([item.type_ids or [0] * len(item.ids)], dtype=torch.int64))
    with torch.no_grad():
        return [o[0].to(dtype).numpy() for o in module(*args)]


def _as_read(item: Tokenized, emb: Embedder) -> Tokenized:
    """The input as the model reads it alone: itself, or padded to the full length for a model trained on
    fixed-length text (SigLIP reads its padding: no attention mask, the last position pooled)."""
    if not emb.card.pad_to_max_length:
        return item
    return Tokenized(item.ids + [emb.manifest.pad_token_id] * (emb.manifest.max_seq_len - len(item)))


def check_parity(artifact: Path, resolved: ResolvedModel, module: EmbeddingModule, precision: str, *,
                 adapter: str | None = None) -> ParityReport:
    """Min cosine per output over batch sizes 1 and 4, short / medium / max lengths, padded and unpadded;
    ``precision``: the graph's own (its gate, and where it runs: ``PrecisionPlan``). ``adapter``: the artifact's
    LoRA adapter of that name against ``module`` with PEFT's same adapter active (the libraries' own checks,
    which read the base weights, are the base's)."""
    plan = PrecisionPlan.of(precision)
    emb = Embedder(artifact, device=plan.parity_device, adapter=adapter)
    outputs = emb.session.output_names
    cap = min(emb.manifest.max_seq_len, _PROBE_CAP)
    probes = _probe_texts(cap)
    pairs = resolved.head.pairs  # cross-encoders read (query, document) pairs
    batches = {
        "b1-short": ["short"], "b1-medium": ["medium"], "b1-max": ["max"],
        "b4-padded": ["short", "medium", "max", "short2"], "b4-unpadded": ["medium"] * 4,
    }
    cases: list[ParityCase] = []
    worst: dict[str, float] = {}
    largest: dict[str, float] = {}
    checked: list[tuple[list[Tokenized], list[list[np.ndarray]], list[list[np.ndarray]]]] = []  # items, got, torch
    for keys in batches.values():
        texts = [probes[k] for k in keys]
        if pairs:  # each probe as the document of a short query
            items = emb.tokenizer.encode_pairs([probes["short2"]] * len(texts), texts, truncate=cap)
        else:
            items = emb.tokenize_inputs(texts, truncate_prompt_tokens=cap)
        got = emb.run_batch(items, outputs, adapter=adapter)
        read = [_as_read(item, emb) for item in items]
        refs = [_reference(module, item, resolved.arch.token_type_ids) for item in read]
        rows = [[emb.unpad(got[o][row], len(item)) if output in TOKEN_OUTPUTS else got[o][row]
                 for o, output in enumerate(outputs)] for row, item in enumerate(items)]
        checked.append((read, rows, refs))
        for o, output in enumerate(outputs):
            cos_min, diff_max = 1.0, 0.0
            for row, ref in zip(rows, refs):
                cos_min = min(cos_min, float(cosines(row[o], ref[o]).min()))
                diff_max = max(diff_max, float(np.abs(row[o] - ref[o]).max()))
            worst[output] = min(worst.get(output, 1.0), cos_min)
            largest[output] = max(largest.get(output, 0.0), diff_max)
            cases.append(ParityCase(output=output, batch=len(items), seq_len=max(len(t) for t in items),
                                    padded=len({len(t) for t in items}) > 1, padding_side=str(emb.card.padding_side.value),
                                    min_cosine=cos_min, max_abs_diff=diff_max))
    reference = "torch" if adapter is None else f"PEFT (adapter '{adapter}')"
    # the libraries' references below load the base weights: an adapter's reference is PEFT's model above only
    if adapter is None and resolved.head.parity_metric == "abs":  # scores: their largest absolute difference, against the library too
        return _score_parity(resolved, emb, probes, cap, precision, cases, largest)
    if adapter is None and resolved.head.image_tower:  # the model's own tokenizer and get_text_features, on the raw texts
        from toolkit.export.towers import text_reference_check

        reference = "transformers tokenizer + get_text_features"
        texts = [probes[k] for k in ("short", "medium", "short2")]
        own = text_reference_check(emb, resolved, module.encoder.model, texts)
        worst["sentence_embedding"] = min(worst["sentence_embedding"], own)
        cases.append(ParityCase(output="sentence_embedding (get_text_features)", batch=3, seq_len=cap, padded=True,
                                padding_side=str(emb.card.padding_side.value), min_cosine=own, max_abs_diff=-1.0))
    if adapter is None and resolved.st_layout and resolved.head.st_reference:
        reference = "sentence-transformers"
        st_cos = _sentence_transformers_check(resolved, emb, [probes[k] for k in ("short", "medium", "max", "short2")], cap)
        worst["sentence_embedding"] = min(worst["sentence_embedding"], st_cos)
        cases.append(ParityCase(output="sentence_embedding (sentence-transformers)", batch=4, seq_len=cap, padded=True,
                                padding_side=str(emb.card.padding_side.value), min_cosine=st_cos, max_abs_diff=-1.0))
    multi_vector: dict[str, float] = {}
    if adapter is None and resolved.head.multi_vector:  # the library's own encode_query / encode_document / similarity on raw texts
        from toolkit.export.late_interaction import multi_vector_check

        reference = "sentence-transformers MultiVectorEncoder"
        queries = [probes["short"], probes["short2"], probes["medium"]]  # the medium one fills the query length
        multi_vector, extra = multi_vector_check(resolved.model_dir, emb, queries, [probes[k] for k in probes],
                                                 str(emb.card.padding_side.value))
        cases.extend(extra)
    threshold = THRESHOLDS[plan.name]
    missed = [o for o, output in enumerate(outputs) if worst[output] < threshold]
    noise: dict[str, list[float]] = {}
    if missed and plan.judges_noise:
        compact = emb.manifest.optimization.get("embedding_table") == "fp16"
        noise = _noise_floor(module, checked, missed, outputs, resolved.arch.token_type_ids, compact)
    passed = all(worst[o] >= threshold or (o in noise and noise[o][0] <= NOISE_FACTOR * noise[o][1])
                 for o in worst)
    passed = passed and all(v <= ABS_THRESHOLDS[plan.name] for v in multi_vector.values())
    return ParityReport(reference=reference, threshold=threshold, min_cosine=worst, cases=cases, passed=passed,
                        noise_floor={k: v for k, v in noise.items()}, max_abs_diff=multi_vector)


def _score_parity(resolved: ResolvedModel, emb: Embedder, probes: dict[str, str], cap: int, precision: str,
                  cases: list[ParityCase], largest: dict[str, float]) -> ParityReport:
    """A cross-encoder's gate: the logits' largest absolute difference from torch, and the scores' from
    sentence-transformers' CrossEncoder.predict (activation included) where it loads the model. A text classifier's:
    the logits' from torch, and the probabilities' from transformers' text-classification pipeline."""
    threshold = ABS_THRESHOLDS[precision]
    if not resolved.head.pairs:
        diff = _pipeline_check(resolved, emb, [probes[k] for k in ("short", "medium", "max", "short2")], cap)
        largest["probabilities (text-classification pipeline)"] = diff
        cases.append(ParityCase(output="probabilities (text-classification pipeline)", batch=4, seq_len=cap,
                                padded=True, padding_side=str(emb.card.padding_side.value), min_cosine=-1.0,
                                max_abs_diff=diff))
        return ParityReport(reference="transformers text-classification pipeline", threshold=threshold,
                            max_abs_diff=largest, cases=cases, passed=all(v <= threshold for v in largest.values()))
    reference = "torch"
    try:
        from sentence_transformers import CrossEncoder

        limit = _reference_length(emb, cap, declared_length(resolved.transformer_dir))
        ce = CrossEncoder(str(resolved.model_dir), device="cpu", max_length=limit,
                          trust_remote_code=resolved.arch.remote_code)
    except Exception:  # noqa: BLE001 - not every sequence classifier loads as a CrossEncoder; torch stays the reference
        ce = None
    if ce is not None:
        reference = "sentence-transformers CrossEncoder"
        documents = [probes[k] for k in ("short", "medium", "max", "short2")]
        expected = np.asarray(ce.predict([(probes["short2"], d) for d in documents], batch_size=4), dtype=np.float64)
        got = emb.score(probes["short2"], documents, truncate_prompt_tokens=limit or -1)
        diff = float(np.abs(got - expected.reshape(got.shape)).max())
        largest["scores (CrossEncoder.predict)"] = diff
        cases.append(ParityCase(output="scores (CrossEncoder.predict)", batch=4, seq_len=cap, padded=True,
                                padding_side=str(emb.card.padding_side.value), min_cosine=-1.0, max_abs_diff=diff))
    passed = all(v <= threshold for v in largest.values())
    return ParityReport(reference=reference, threshold=threshold, max_abs_diff=largest, cases=cases, passed=passed)


def _reference_length(emb: Embedder, cap: int, declared: int | None) -> int | None:
    """Where the library reference is told to cut: nowhere (None: it truncates at its own ``declared`` length, and
    the artifact at its own, so a different length shows as a parity miss) unless the probes are capped below the
    model's length or the reference declares none (it would not truncate at all)."""
    return None if cap >= emb.manifest.max_seq_len and declared else cap


def _pipeline_check(resolved: ResolvedModel, emb: Embedder, texts: list[str], cap: int) -> float:
    """transformers' text-classification pipeline (its default activation, every label) on the raw texts, cut at
    ``cap`` tokens as the artifact was, vs the artifact's probabilities: the largest absolute difference."""
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(resolved.model_dir), device="cpu", top_k=None,
                          trust_remote_code=resolved.arch.remote_code)
    expected = np.zeros((len(texts), len(emb.card.labels)))
    for row, scores in enumerate(classifier(texts, truncation=True, max_length=cap)):
        for entry in scores:
            expected[row, emb.card.labels.index(entry["label"])] = entry["score"]
    got = emb.classify(texts, truncate_prompt_tokens=cap)
    return float(np.abs(got - expected).max())


def _noise_floor(module: EmbeddingModule, checked, missed: list[int], outputs: list[str], uses_types: bool,
                 compact_table: bool) -> dict[str, list[float]]:
    """Per missed output: [max (1 - cos) of the artifact vs float64, max (1 - cos) of torch fp32 vs float64],
    over every checked input and position, torch fp32 run with its default thread count and with one
    (two samples of rounding; floored at _NOISE_MIN)."""
    embeddings = module.encoder.get_input_embeddings()
    table = embeddings.weight.data.clone()
    artifact_err = {o: 0.0 for o in missed}
    torch_err = {o: 0.0 for o in missed}
    threads = torch.get_num_threads()
    try:
        if compact_table:  # the artifact stores its lookup table in fp16: so does the reference here
            embeddings.weight.data = table.half().float()
        # two samples of fp32 rounding: the thread count changes how the GEMMs split their sums
        torch32 = []
        for n_threads in dict.fromkeys((threads, 1)):
            torch.set_num_threads(n_threads)
            torch32.append([[_reference(module, item, uses_types) for item in items] for items, _, _ in checked])
        torch.set_num_threads(threads)
        module.double()
        for c, (items, rows, _) in enumerate(checked):
            for i, (item, row) in enumerate(zip(items, rows)):
                exact = _reference(module, item, uses_types, dtype=torch.float64)
                for o in missed:
                    artifact_err[o] = max(artifact_err[o], float((1 - cosines(row[o], exact[o])).max()))
                    for sample in torch32:
                        torch_err[o] = max(torch_err[o], float((1 - cosines(sample[c][i][o], exact[o])).max()))
    finally:
        torch.set_num_threads(threads)
        module.float()
        embeddings.weight.data = table
    return {outputs[o]: [artifact_err[o], max(torch_err[o], _NOISE_MIN)] for o in missed}


def _sentence_transformers_check(resolved: ResolvedModel, emb: Embedder, texts: list[str], cap: int) -> float:
    """sentence-transformers' own encode() on the raw texts vs the artifact."""
    from sentence_transformers import SentenceTransformer

    # a Transformer module with its own modeling code loads only as its user loads it: trusting that code
    st = SentenceTransformer(str(resolved.model_dir), device="cpu", trust_remote_code=resolved.arch.remote_code)
    if (limit := _reference_length(emb, cap, st.max_seq_length)) is not None:
        st.max_seq_length = limit
    st.tokenizer.padding_side = emb.card.padding_side.value
    ref = st.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    got = emb.embed(texts, truncate_prompt_tokens=limit or -1)
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
