"""Peak memory of `toolkit export` on a large synthetic decoder: how many copies of the weights it holds.

    python benchmarks/export_memory.py [--hidden 1024 --layers 28 --vocab 151936] [--keep DIR]

Builds a random-weight Qwen3 of the given shape (default: Qwen3-0.6B's, 0.6 B parameters, 2.4 GB in fp32) with
a small trained tokenizer, then runs `toolkit export DIR --pooling last_token` as a subprocess, sampling the
resident memory of its process tree every 0.1 s and noting the step it was in (the CLI prints each step as it
ends). Prints the weights' size, the peak, their ratio, and the peak per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from bulk_bench import tree_rss  # noqa: E402 - the resident memory of a process and its children


def build(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    from tiny_models import build_tiny_model

    heads = max(hidden // 128, 1)
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": max(heads // 2, 1), "head_dim": 128, "intermediate_size": hidden * 3,
              "vocab_size": vocab, "max_position_embeddings": 512, "tie_word_embeddings": True}
    build_tiny_model("qwen3", folder, config=config)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--keep", type=Path, help="Build the model here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="export-memory-"))
    folder = work / "model"
    if not (folder / "config.json").is_file():
        weights = build(folder, args.hidden, args.layers, args.vocab)
    else:
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    command = [sys.executable, "-m", "toolkit.cli", "export", str(folder), "--pooling", "last_token", "-o",
               str(work / "model.onnx")]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle = psutil.Process(proc.pid)
    steps: list[tuple[float, str]] = []

    def read_steps() -> None:
        for line in proc.stderr:
            steps.append((time.perf_counter() - started, line.strip()))

    reader = threading.Thread(target=read_steps, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - started, tree_rss(handle)))
        time.sleep(0.1)
    reader.join(timeout=5)
    if proc.returncode:
        sys.exit("export failed:\n" + "\n".join(line for _, line in steps[-20:]))
    peak = max(rss for _, rss in samples)
    per_step = []
    begin = 0.0
    for end, line in steps:
        if line.startswith("✓"):
            inside = [rss for t, rss in samples if begin <= t <= end] or [0]
            per_step.append({"step": line.split(" (")[0].lstrip("✓ "), "seconds": round(end - begin, 1),
                             "peak_gib": round(max(inside) / 2**30, 2)})
            begin = end
    result = {"parameters_gb_fp32": round(weights / 1e9, 2), "weights_gib": round(weights / 2**30, 2),
              "peak_rss_gib": round(peak / 2**30, 2), "peak_over_weights": round(peak / weights, 2),
              "seconds": round(time.perf_counter() - started, 1), "steps": per_step,
              "artifact_bytes": sum(p.stat().st_size for p in work.glob("model.onnx*"))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
