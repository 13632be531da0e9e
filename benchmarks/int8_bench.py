"""int8 vs fp32 vs sentence-transformers on the CPU at hand, side by side in one process.

    python benchmarks/int8_bench.py FP32.onnx INT8.onnx [--texts 512] [--batch-sizes 1,32] [--repeats 5] [--json out.json]

Both artifacts must be the same model (``toolkit export`` and ``toolkit export --precision int8``); the reference
is sentence-transformers on that model (the bundled all-MiniLM-L6-v2 by default, ``--reference DIR`` otherwise).
The ceiling runs beside them: the fp32 artifact with every weight GEMM in int8, in the int8 artifact's form
(``optimization.int8_form``), no smoothing, no gate: the fastest int8 this CPU's kernels allow that model, so the
chosen artifact's rate over the ceiling's says how much of it the gate kept.
The engines run interleaved (each repeat times every engine once, in turn) on the corpus slice, in calls of each
batch size and as the whole slice in one call; medians over repeats. Accuracy: the int8 artifact's min cosine and
top-10 neighbour overlap vs the fp32 artifact on the same texts. The first line names the CPU and its flags: int8
kernels differ between CPUs (VNNI or not), so a figure without its CPU says little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--reference", default=None, help="sentence-transformers model directory [default: bundled]")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from toolkit.corpus import load_corpus
    from toolkit.cpu import describe
    from toolkit.export.optimize import DEFAULT_INT8_FORM, quantize_int8
    from toolkit.export.parity import neighbour_overlap
    from toolkit.model_source import default_model_dir
    from toolkit.runtime import Embedder
    from toolkit.runtime.pooling import cosines

    texts = load_corpus(limit=args.texts)
    fp32, int8 = Embedder(args.fp32, device="cpu"), Embedder(args.int8, device="cpu")
    form = int8.manifest.optimization.get("int8_form", DEFAULT_INT8_FORM)
    scratch = tempfile.TemporaryDirectory(prefix="int8-ceiling-")
    ceiling = Embedder(quantize_int8(args.fp32, Path(scratch.name) / "every-gemm.onnx", form=form), device="cpu")
    st = SentenceTransformer(str(args.reference or default_model_dir()), device="cpu")
    engines = {"toolkit int8": lambda batch: int8.embed(batch, truncate_prompt_tokens=-1),
               "int8 ceiling": lambda batch: ceiling.embed(batch, truncate_prompt_tokens=-1),
               "toolkit fp32": lambda batch: fp32.embed(batch, truncate_prompt_tokens=-1),
               "sentence-transformers": lambda batch: st.encode(batch, batch_size=32, convert_to_numpy=True)}
    a = fp32.embed(texts, truncate_prompt_tokens=-1)
    accuracy = {}
    for name, emb in (("int8", int8), ("ceiling", ceiling)):
        b = emb.embed(texts, truncate_prompt_tokens=-1)
        accuracy[name] = {"min_cosine_vs_fp32": float(cosines(b, a).min()), "top10_overlap_vs_fp32": neighbour_overlap(b, a)}
    print(f"CPU: {describe()}; {len(texts)} corpus texts; int8 MatMuls "
          f"{int8.manifest.optimization.get('int8_matmuls')} in form {form}, gated on "
          f"{int8.manifest.optimization.get('int8_gated_on')}")
    for name, label in (("int8", "int8 (gated)"), ("ceiling", "ceiling (every GEMM int8, no gate)")):
        print(f"{label} vs fp32: min cosine {accuracy[name]['min_cosine_vs_fp32']:.5f}, top-10 overlap "
              f"{accuracy[name]['top10_overlap_vs_fp32']:.3f}")
    shapes = {f"calls of {n}": n for n in map(int, args.batch_sizes.split(","))}
    shapes["whole slice"] = len(texts)
    for fn in engines.values():  # warm-up
        fn(texts[:32])
    results = {}
    for shape, n in shapes.items():
        chunks = [texts[i:i + n] for i in range(0, len(texts), n)]
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, fn in engines.items():
                start = time.perf_counter()
                for chunk in chunks:
                    fn(chunk)
                times[name].append(time.perf_counter() - start)
        rates = {name: len(texts) / statistics.median(t) for name, t in times.items()}
        results[shape] = rates
        st_rate, fp32_rate = rates["sentence-transformers"], rates["toolkit fp32"]
        for name, rate in rates.items():
            print(f"{shape:>13} | {name:<22} {rate:8.1f} texts/s | vs ST {rate / st_rate:5.2f}x | "
                  f"vs toolkit fp32 {rate / fp32_rate:5.2f}x")
        print(f"{shape:>13} | toolkit int8 at {rates['toolkit int8'] / rates['int8 ceiling']:.2f} of the ceiling")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "texts": len(texts), "repeats": args.repeats,
                                         "int8_matmuls": int8.manifest.optimization.get("int8_matmuls"),
                                         "int8_form": form,
                                         "accuracy": accuracy, "texts_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
