"""Late interaction: the toolkit's ColBERT artifact against sentence-transformers' ``MultiVectorEncoder``.

    .venv/bin/python benchmarks/late_interaction_bench.py [--documents 256] [--repeats 3] [--json out.json]

The Hub is out of reach here, so the model is a ColBERT of all-MiniLM-L6-v2's shape and weights (the bundled
checkpoint) with a random 384 -> 128 projection, queries expanded to 32 tokens and documents cut at 180
(ColBERTv2's lengths), saved by ``MultiVectorEncoder`` (speed depends on the shape, not on the weights). It is
exported once, its parity checked as every export is, then measured side by side, interleaved, best of
``--repeats``, in this process:

- documents encoded (documents/s): ``embed_multi(docs)`` vs ``encode_document(docs, batch_size=32)``;
- queries encoded one per call (queries/s): ``embed_multi([q], is_query=True)`` vs ``encode_query([q])``;
- MaxSim scored (pairs/s), 32 queries x all documents, vectors given: ``max_sim`` vs ``similarity``;
- a rerank call, one query and 32 documents end to end (calls/s): ``rerank`` vs encode + ``similarity``.

Prints a Markdown table naming the CPU, and the command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder [default: a temporary one]")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import MultiVectorEncoder
    from tiny_models import build_tiny_colbert

    from toolkit.corpus import load_corpus
    from toolkit.export import export_model
    from toolkit.export.resolve import default_model_dir
    from toolkit.runtime import Embedder
    from toolkit.settings import ExportOptions

    torch.set_num_threads(torch.get_num_threads())  # the library's default: every core, as onnxruntime's
    work = args.out or Path(tempfile.mkdtemp(prefix="late-interaction-bench-"))
    model_dir = work / "colbert-minilm"
    if not (model_dir / "modules.json").is_file():
        build_tiny_colbert(model_dir, query_length=32, document_length=180, encoder=default_model_dir())
    started = time.perf_counter()
    result = export_model(str(model_dir), ExportOptions(output=work / "colbert-minilm.onnx"))
    export_s = time.perf_counter() - started
    emb = Embedder(result.path, device="cpu")
    mve = MultiVectorEncoder(str(model_dir), device="cpu")

    texts = [t for t in load_corpus() if len(t) <= 1200]
    documents, queries = texts[:args.documents], [t[:80] for t in texts[-32:]]
    ours_q, ours_d = emb.embed_multi(queries, is_query=True), emb.embed_multi(documents)
    ref_q = [np.asarray(m, np.float32) for m in mve.encode_query(queries, batch_size=32)]
    ref_d = [np.asarray(m, np.float32) for m in mve.encode_document(documents, batch_size=32)]
    agreement = float(np.abs(emb.max_sim(ours_q, ours_d) - mve.similarity(ref_q, ref_d).numpy()).max())
    rerank_docs = documents[:32]

    cases = {
        "documents encoded (docs/s)": (
            len(documents),
            lambda: emb.embed_multi(documents),
            lambda: mve.encode_document(documents, batch_size=32)),
        "queries, one per call (queries/s)": (
            len(queries),
            lambda: [emb.embed_multi([q], is_query=True) for q in queries],
            lambda: [mve.encode_query([q]) for q in queries]),
        f"MaxSim, 32 queries x {len(documents)} documents (pairs/s)": (
            len(queries) * len(documents),
            lambda: emb.max_sim(ours_q, ours_d),
            lambda: mve.similarity(ref_q, ref_d)),
        "rerank: 1 query + 32 documents (calls/s)": (
            1,
            lambda: emb.rerank(queries[0], rerank_docs),
            lambda: mve.similarity(mve.encode_query([queries[0]]), mve.encode_document(rerank_docs, batch_size=32))),
    }
    rows = []
    with torch.inference_mode():
        for name, (count, ours, theirs) in cases.items():
            ours(), theirs()  # warm
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):  # interleaved: a slow moment hits both
                t_ours.append(best(ours, 1))
                t_theirs.append(best(theirs, 1))
            rate_ours, rate_theirs = count / min(t_ours), count / min(t_theirs)
            rows.append({"measure": name, "toolkit": rate_ours, "MultiVectorEncoder": rate_theirs,
                         "ratio": rate_ours / rate_theirs})
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"## Late interaction vs sentence-transformers MultiVectorEncoder\n\nCPU: {cpu_name()}; command: `{command}`")
    print(f"\nModel: all-MiniLM-L6-v2's encoder + a random 384 -> 128 projection (query 32, document 180 tokens); "
          f"export {export_s:.1f} s, parity within {max(result.manifest.parity.max_abs_diff.values(), default=0):.1e} "
          f"(largest difference from MultiVectorEncoder); MaxSim of both here agrees within {agreement:.1e}\n")
    print("| measure | toolkit | MultiVectorEncoder | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['measure']} | {row['toolkit']:,.1f} | {row['MultiVectorEncoder']:,.1f} | "
              f"**{row['ratio']:.2f}x** |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "command": command, "export_s": export_s,
                                         "maxsim_agreement": agreement, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
