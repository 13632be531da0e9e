"""Where the time goes, by operator: onnxruntime's profiler over one-sentence calls and planned batches.

    .venv/bin/python benchmarks/profile_ops.py ARTIFACT [--texts 128]

Prints, for bs1 (one corpus sentence per call) and for the whole corpus in planned batches, each
operator type's share of kernel time, and the share of wall time spent outside kernels
(session overhead, thread hand-offs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile(artifact: str, batches: list[dict], label: str) -> None:
    import onnxruntime as ort

    from toolkit.settings import default_threads

    so = ort.SessionOptions()
    so.intra_op_num_threads = default_threads()
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(artifact, so, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        for feeds in batches[:4]:  # warm-up
            session.run(["sentence_embedding"], {k: v for k, v in feeds.items() if k in names})
        start = time.perf_counter()
        for feeds in batches:
            session.run(["sentence_embedding"], {k: v for k, v in feeds.items() if k in names})
        wall_us = (time.perf_counter() - start) * 1e6
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    # the profiler saw the warm-up runs too: scale kernel time to the timed runs
    timed = len(batches) / max(len(runs), 1)
    kernels = sum(per_op.values()) * timed
    print(f"\n{label}: {len(batches)} calls, {wall_us / len(batches) / 1e3:.2f} ms per call (profiling on)")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        share = us * timed / wall_us * 100
        if share >= 0.5:
            print(f"  {op:28s} {share:5.1f} %")
    print(f"  {'(outside kernels)':28s} {max(0.0, 100 - kernels / wall_us * 100):5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--texts", type=int, default=128)
    args = parser.parse_args()
    from toolkit.corpus import load_corpus
    from toolkit.runtime import Embedder
    from toolkit.runtime.batching import plan_batches
    from toolkit.runtime.tokenization import pad_batch

    emb = Embedder(args.artifact, device="cpu")
    items = emb.tokenize_inputs(load_corpus(limit=args.texts), truncate_prompt_tokens=-1)
    pad = {"pad_id": emb.manifest.pad_token_id, "side": emb.padding, "type_ids": "token_type_ids" in emb.session.input_names}
    singles = [pad_batch([t], **pad) for t in items]
    planned = [pad_batch([items[i] for i in b], **pad)
               for b in plan_batches([len(t) for t in items], max_batch_tokens=emb.options.max_batch_tokens,
                                     max_batch_size=emb.options.max_batch_size)]
    print(f"{emb.card.name} {emb.manifest.precision}; graph form: {emb.manifest.optimization.get('kept', '-')}")
    profile(args.artifact, singles, "bs1")
    profile(args.artifact, planned, "planned batches")


if __name__ == "__main__":
    main()
