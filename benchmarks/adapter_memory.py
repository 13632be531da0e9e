"""Memory and speed of N LoRA adapters on one base artifact, against N separate merged models.

    python benchmarks/adapter_memory.py [--adapters 8] [--rank 16] [--out DIR]

Makes N random PEFT LoRA adapters (query + value, rank R, seeded 0..N-1) of all-MiniLM-L6-v2's BertModel,
exports the base once with all of them (`--adapter NAME=DIR` each) and once plain, then:

- resident memory, each in a fresh subprocess, after opening and embedding 32 texts: the plain artifact;
  the adapter artifact with its N adapters opened and each used once;
- throughput (texts/s, 256 short corpus texts in one `embed` call, best of 3, interleaved in one process): plain,
  adapter artifact with no adapter active, adapter artifact with one active.

Prints Markdown tables, the CPU and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
SHORT = 300  # characters: "short" texts (all fit MiniLM's 256-token window; a few corpus texts do not)


def short_texts(n: int) -> list[str]:
    """The first ``n`` corpus texts of at most SHORT characters."""
    from toolkit.corpus import load_corpus

    return [text for text in load_corpus() if len(text) <= SHORT][:n]


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(artifact: str) -> None:
    """Child mode: open ``artifact``, embed 32 texts (with every adapter it has, then the base), print JSON."""
    from toolkit.runtime import Embedder

    texts = short_texts(32)
    imported = proc_status("VmRSS")
    emb = Embedder(artifact, device="cpu")
    for name in emb.adapters:
        emb.embed(texts, adapter=name)
    emb.embed(texts)
    print(json.dumps({"imported": imported, "rss": proc_status("VmRSS"), "peak": proc_status("VmHWM"),
                      "numbers": {name: a.size for name, a in emb.adapters.items()}}))


def make_adapters(folder: Path, n: int, rank: int, work: Path) -> list[str]:
    """N PEFT LoRA adapter folders with random (nonzero) weights; returns their NAME=DIR options."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    options = []
    for i in range(n):
        torch.manual_seed(i)  # each adapter its own weights
        model = AutoModel.from_pretrained(folder)  # a fresh base each time: get_peft_model edits it in place
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], init_lora_weights=False)
        out = work / "peft" / f"a{i}"
        get_peft_model(model, config).save_pretrained(str(out))
        options.append(f"a{i}={out}")
    return options


def export(output: Path, adapters: tuple[str, ...]) -> float:
    """Export the bundled MiniLM to ``output`` (with ``adapters``); returns the seconds it took."""
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_model(None, ExportOptions(output=output, adapters=adapters))
    return time.perf_counter() - started


def artifact_bytes(path: Path) -> int:
    """The graph file and its external weights (``X.onnx``, ``X.onnx.data``), not the adapter files."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def child(artifact: Path) -> dict:
    """``measure`` in a fresh interpreter, so its resident memory holds only that artifact."""
    done = subprocess.run([sys.executable, __file__, "--measure", str(artifact)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"measuring {artifact} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(results: list[dict]) -> dict:
    """The median of each memory figure over ``results``; the adapters' sizes are the same in each."""
    return {**{key: statistics.median(r[key] for r in results) for key in ("imported", "rss", "peak")},
            "numbers": results[0]["numbers"]}


def throughput(plain: Path, lora: Path, active: str) -> dict[str, float]:
    """Texts/s of one 256-text `embed` call, best of 3, the three configurations interleaved."""
    from toolkit.runtime import Embedder

    texts = short_texts(256)
    base, slotted = Embedder(plain, device="cpu"), Embedder(lora, device="cpu")
    runs = {"plain artifact": lambda: base.embed(texts),
            "adapter artifact, adapter=None": lambda: slotted.embed(texts, adapter=None),
            f"adapter artifact, adapter={active}": lambda: slotted.embed(texts, adapter=active)}
    for run in runs.values():  # warm-up: first-run allocations and thread start-up out of the timings
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(3):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            best[label] = min(best[label], time.perf_counter() - started)
    return {label: len(texts) / seconds for label, seconds in best.items()}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="How many LoRA adapters (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="Their LoRA rank r (default 16; alpha = 2r)")
    parser.add_argument("--out", type=Path, help="Work folder (default: a new temporary folder)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh-subprocess memory probe
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])  # the interpreter, as run from here
    work = args.out or Path(tempfile.mkdtemp(prefix="adapter-memory-"))
    from toolkit.model_source import default_model_dir

    n = args.adapters
    options = make_adapters(default_model_dir(), n, args.rank, work)
    plain, lora = work / "plain" / "minilm.onnx", work / "lora" / "minilm.onnx"
    plain_seconds = export(plain, ())
    lora_seconds = export(lora, tuple(options))
    from toolkit.runtime.artifact import adapter_path

    files = {f"a{i}": adapter_path(lora, f"a{i}").stat().st_size for i in range(n)}
    base_size, lora_size = artifact_bytes(plain), artifact_bytes(lora)

    # three fresh processes each, interleaved; the median of each figure (RSS moves by a few MiB run to run)
    runs = [(child(plain), child(lora)) for _ in range(3)]
    mem_plain, mem_lora = (median_of([r[k] for r in runs]) for k in (0, 1))
    speed = throughput(plain, lora, "a0")

    per_adapter = (mem_lora["rss"] - mem_plain["rss"]) / n
    print(f"## LoRA adapters on one base artifact: all-MiniLM-L6-v2, {n} adapters, rank {args.rank} (query, value)\n")
    print(f"CPU: {cpu_name()}\n\nCommand: `{command}`\n")
    print(f"Export: plain {plain_seconds:.1f} s; with {n} adapters (one call, each checked against PEFT) "
          f"{lora_seconds:.1f} s\n")
    print("| after opening + embedding 32 texts (fresh process, median of 3) | RSS | peak (VmHWM) |")
    print("|---|---|---|")
    print(f"| interpreter + imports only | {mem_plain['imported'] / MIB:.1f} MiB | |")
    print(f"| plain artifact ({base_size / MIB:.1f} MiB on disk) | {mem_plain['rss'] / MIB:.1f} MiB "
          f"| {mem_plain['peak'] / MIB:.1f} MiB |")
    print(f"| adapter artifact ({lora_size / MIB:.1f} MiB on disk) + {n} adapters, each used once "
          f"| {mem_lora['rss'] / MIB:.1f} MiB | {mem_lora['peak'] / MIB:.1f} MiB |")
    print(f"| difference per adapter | {per_adapter / MIB:+.2f} MiB | |")
    print(f"| {n} separate merged models instead ({n} x {base_size / MIB:.1f} MiB artifact) "
          f"| {n * base_size / MIB:.1f} MiB on disk | |\n")
    print("| adapter | numbers | file |")
    print("|---|---|---|")
    for name, size in files.items():
        print(f"| {name} | {mem_lora['numbers'][name]:,} | {size / 1024:.1f} KiB |")
    print(f"| all {n} | {sum(mem_lora['numbers'].values()):,} | {sum(files.values()) / MIB:.2f} MiB |\n")
    print(f"| 256 corpus texts (<= {SHORT} chars), one `embed` call, best of 3, interleaved | texts/s | vs plain |")
    print("|---|---|---|")
    reference = speed["plain artifact"]
    for label, rate in speed.items():
        print(f"| {label} | {rate:.1f} | {rate / reference:.3f}x |")
    print(f"\nWork folder: {work}")


if __name__ == "__main__":
    main()
