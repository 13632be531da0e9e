"""Online latency while a Batch API batch runs, against the same server idle, in one run.

    python benchmarks/batch_latency.py ARTIFACT [--lines 20000] [--requests 500] [--serve-args='...'] [--json out.json]

A real `toolkit serve ARTIFACT --batch-dir` on 127.0.0.1. One client sends single-text /v1/embeddings requests
(one at a time, ``--pause`` apart, as interactive traffic) while the server is idle, then while a batch of
``--lines`` single-text /v1/embeddings lines runs (only the requests that end before the batch does count), then
idle again. It prints p50 / p99 of each phase, the ratios to idle, the batch's throughput and the CPU. Texts are
the corpus' (toolkit/data/corpus.jsonl), cut to the model's window. Every wait is bounded (``--timeout``); the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from toolkit.corpus import load_corpus
from toolkit.cpu import describe

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def start_server(artifact: str, folder: str, *args: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", artifact, "--port", str(port), "--api-key",
                             KEY, "--log-level", "error", "--batch-dir", folder, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready")


def probe(client: httpx.Client, texts: list[str], n: int, pause: float, stop=lambda: False) -> list[tuple[float, float]]:
    """(end time, seconds) of up to ``n`` single-text requests, one at a time."""
    timings = []
    for i in range(n):
        if stop():
            break
        started = time.perf_counter()
        answer = client.post("/v1/embeddings", json={"input": texts[i % len(texts)], "truncate_prompt_tokens": -1})
        if answer.status_code != 200:
            raise SystemExit(f"an online request failed: {answer.status_code} {answer.text[:300]}")
        timings.append((time.perf_counter(), time.perf_counter() - started))
        time.sleep(pause)
    return timings


def summary(seconds: list[float]) -> dict:
    return {"n": len(seconds), "p50_ms": round(percentile(seconds, 0.5) * 1e3, 2),
            "p99_ms": round(percentile(seconds, 0.99) * 1e3, 2), "max_ms": round(max(seconds) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=500, help="online requests per phase")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between online requests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the batch may take")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-args", default="", help="more `toolkit serve` options, one string: "
                                                         "--serve-args='--batch-concurrency 4'")
    args = parser.parse_args()
    serve_args = shlex.split(args.serve_args)
    texts = load_corpus()
    online, batch_texts = texts[:1000], texts[1000:]
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_server(args.artifact, folder, *serve_args)
        try:
            client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
            probe(client, online, 30, 0.0)  # warm up
            idle = [s for _, s in probe(client, online, args.requests, args.pause)]
            lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                        "body": {"input": batch_texts[i % len(batch_texts)],
                                                 "truncate_prompt_tokens": -1}}) + "\n"
                            for i in range(args.lines))
            uploaded = client.post("/v1/files", files={"file": ("lines.jsonl", lines.encode())},
                                   data={"purpose": "batch"}).raise_for_status().json()
            batch = client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings",
                                                     "completion_window": "24h"}).raise_for_status().json()
            state = {"status": batch["status"], "ended": None, "started": None}

            def watch() -> None:
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline:
                    current = client.get(f"/v1/batches/{batch['id']}").json()
                    if state["started"] is None and current["request_counts"]["completed"] > 0:
                        state["started"] = time.perf_counter()
                    if current["status"] in ("completed", "failed", "cancelled", "expired"):
                        state.update(status=current["status"], ended=time.perf_counter(), batch=current)
                        return
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch)
            watcher.start()
            while state["started"] is None and watcher.is_alive():
                time.sleep(0.01)
            busy = probe(client, online, args.requests, args.pause, stop=lambda: state["ended"] is not None)
            watcher.join()
            if state["ended"] is None:
                raise SystemExit(f"the batch did not finish within {args.timeout} s")
            during = [s for end, s in busy if end < state["ended"]]
            after = [s for _, s in probe(client, online, args.requests, args.pause)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    counts = state["batch"]["request_counts"]
    seconds = state["ended"] - state["started"]
    result = {"cpu": describe(), "artifact": Path(args.artifact).name, "serve_args": serve_args,
              "batch": {"status": state["status"], **counts, "seconds": round(seconds, 1),
                        "lines_per_s": round(counts["completed"] / seconds, 1)},
              "idle": summary(idle), "during_batch": summary(during), "idle_after": summary(after)}
    result["ratio_p50"] = round(result["during_batch"]["p50_ms"] / result["idle"]["p50_ms"], 2)
    result["ratio_p99"] = round(result["during_batch"]["p99_ms"] / result["idle"]["p99_ms"], 2)
    print(f"CPU: {result['cpu']}; {result['artifact']}; batch of {args.lines} lines: {result['batch']}")
    for phase in ("idle", "during_batch", "idle_after"):
        print(f"{phase:>13}: {result[phase]}")
    print(f"during batch / idle: p50 {result['ratio_p50']}x, p99 {result['ratio_p99']}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
