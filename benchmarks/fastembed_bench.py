"""The toolkit vs fastembed on the CPU at hand, side by side in one run: batch-1 latency and bulk throughput.

    python benchmarks/fastembed_bench.py ARTIFACT OPTIMUM_DIR [--texts 200] [--repeats 5] [--json out.json]

fastembed runs as its users run it: ``TextEmbedding("sentence-transformers/all-MiniLM-L6-v2",
specific_model_path=OPTIMUM_DIR)`` on optimum's ONNX export of the same model (mean pooling and normalization in
fastembed's numpy), in its own virtualenv (``--fastembed-python``; it pins its own dependencies), with the same
onnxruntime version and 2 intra-op threads. The toolkit runs ``Embedder.embed`` on its own artifact in this
process. The engines alternate: each repeat times the toolkit, then fastembed (a fresh worker process; loading
is not timed). Shapes: one text per call (batch 1) over the corpus slice, calls of 32, the whole slice in one
call; medians over repeats. Also printed: where the toolkit's batch-1 time goes (tokenize, pad, session run, pool
and normalize in the graph), measured with the same calls.

Setup (see benchmarks/README.md): the fastembed virtualenv and optimum's export, both outside the toolkit's venv
because optimum-onnx 0.1.0 needs transformers < 4.58.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import numpy as np
from fastembed import TextEmbedding
job = json.load(sys.stdin)
model = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", specific_model_path=job["model"], threads=2)
texts, n = job["texts"], job["n"]
list(model.embed(texts[:8]))  # warm-up
start = time.perf_counter()
out = [v for i in range(0, len(texts), n) for v in model.embed(texts[i:i + n], batch_size=max(n, 1))]
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "vectors": np.asarray(out[:job["keep"]]).tolist()}, sys.stdout)
"""


def _fastembed(python: str, model: Path, texts: list[str], n: int, keep: int = 0) -> dict:
    job = json.dumps({"model": str(model), "texts": texts, "n": n, "keep": keep})
    done = subprocess.run([python, "-c", WORKER], input=job, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"fastembed worker failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _phases(emb, texts: list[str]) -> dict[str, float]:
    """Where one-text calls spend their time, ms per call: the tokenizer, padding into arrays, the onnxruntime
    session run (the graph pools and normalizes too), and the whole of ``Embedder.embed`` on the same text (so its
    own overhead, checks, planning and the task table, is the total less the three)."""
    import numpy as np

    totals = dict.fromkeys(("tokenize", "arrays", "session run", "embed() total"), 0.0)
    session = emb.session
    names, output = list(session.input_names), session.output_names[0]
    for text in texts:
        t0 = time.perf_counter()
        (item,) = emb.tokenizer.encode([text], truncate=-1)
        ids = list(item.ids)
        t1 = time.perf_counter()
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros((1, len(ids)), np.int64)
        t2 = time.perf_counter()
        session.run([output], feeds)
        t3 = time.perf_counter()
        emb.embed([text], truncate_prompt_tokens=-1)
        t4 = time.perf_counter()
        for key, span in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += span
    return {key: 1000 * value / len(texts) for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path, help="the toolkit's artifact (fp32 all-MiniLM-L6-v2)")
    parser.add_argument("optimum_dir", type=Path, help="optimum's ONNX export of the same model (fastembed's input)")
    parser.add_argument("--fastembed-python", default=".cache/tools/fastembed/bin/python")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np

    from toolkit.corpus import load_corpus
    from toolkit.cpu import describe
    from toolkit.runtime import Embedder
    from toolkit.runtime.pooling import cosines

    texts = load_corpus(limit=args.texts)
    emb = Embedder(args.artifact, device="cpu")
    emb.embed(texts[:8])
    check = _fastembed(args.fastembed_python, args.optimum_dir, texts, 32, keep=len(texts))
    agreement = float(cosines(emb.embed(texts, truncate_prompt_tokens=-1), np.asarray(check["vectors"])).min())
    print(f"CPU: {describe()}; {len(texts)} corpus texts; min cosine toolkit vs fastembed {agreement:.7f}")
    shapes = {"batch 1": 1, "calls of 32": 32, "whole slice": len(texts)}
    results = {}
    for shape, n in shapes.items():
        ours, theirs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(0, len(texts), n):
                emb.embed(texts[i:i + n], truncate_prompt_tokens=-1)
            ours.append(time.perf_counter() - start)
            theirs.append(_fastembed(args.fastembed_python, args.optimum_dir, texts, n)["seconds"])
        tk, fe = len(texts) / statistics.median(ours), len(texts) / statistics.median(theirs)
        results[shape] = {"toolkit_texts_per_s": tk, "fastembed_texts_per_s": fe, "ratio": tk / fe,
                          "toolkit_ms_per_call": 1000 * statistics.median(ours) / -(-len(texts) // n),
                          "fastembed_ms_per_call": 1000 * statistics.median(theirs) / -(-len(texts) // n)}
        print(f"{shape:>12}: toolkit {tk:7.1f} texts/s ({results[shape]['toolkit_ms_per_call']:.2f} ms/call), "
              f"fastembed {fe:7.1f} ({results[shape]['fastembed_ms_per_call']:.2f} ms/call): {tk / fe:.2f}x")
    phases = _phases(emb, texts)
    print("toolkit batch 1, ms per call: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "texts": len(texts), "repeats": args.repeats,
                                         "min_cosine_vs_fastembed": agreement, "results": results,
                                         "toolkit_batch1_phases_ms": phases}, indent=2) + "\n")


if __name__ == "__main__":
    main()
