"""`toolkit embed` in-process vs `--engine ray` on this machine: rows/s and peak memory.

    python benchmarks/bulk_bench.py ARTIFACT [--rows 50000] [--ray-threads 1,2]

Writes ROWS corpus texts (the bundled toolkit/data/corpus.jsonl cycled, each row a distinct id) as JSON Lines,
then runs `toolkit embed` as a subprocess once per engine, sampling the resident memory of the whole process tree
(the command, and for Ray its raylet, GCS and actor processes) every 0.2 s. Prints one table row per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from toolkit.corpus import load_corpus


def write_input(path: Path, rows: int) -> None:
    texts = load_corpus()
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": texts[i % len(texts)]}) + "\n")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(label: str, command: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(handle))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read()
    if proc.returncode:
        sys.exit(f"{label} failed:\n{stderr[-3000:]}")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))
    return {"engine": label, "rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1),
            "peak_rss_mib": round(peak / 2**20), "summary": stderr.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--ray-threads", default="1,2", help="onnxruntime threads of the one Ray actor, per run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    source = work / "input.jsonl"
    write_input(source, args.rows)
    base = [sys.executable, "-m", "toolkit.cli", "embed", args.artifact, str(source), "--id-column", "id", "--truncate"]
    results = [run("in-process", [*base, "-o", str(work / "local")], work / "local")]
    for threads in args.ray_threads.split(","):
        results.append(run(f"ray, 1 actor x {threads} threads",
                           [*base, "-o", str(work / "ray"), "--engine", "ray", "--threads", threads], work / "ray"))
    print(f"{args.rows:,} rows, {args.artifact}")
    print("| engine | rows/s | wall s | peak RSS of the process tree |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['rows_per_s']:,.0f} | {r['seconds']} | {r['peak_rss_mib']:,} MiB |")
    print(json.dumps(results, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
