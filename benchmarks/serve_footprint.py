"""Start-up time and memory of `toolkit serve` vs a sentence-transformers process on the same model.

    .venv/bin/python benchmarks/serve_footprint.py ARTIFACT [--model-dir DIR] [--port 8011]

Prints: seconds from launching `toolkit serve` to /ready answering 200; the server's RSS after
warm-up (64 requests); the RSS of a Python process that loads the model with
sentence-transformers and encodes the same texts; and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_ST_SCRIPT = """
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.loads(sys.argv[2])
model = SentenceTransformer(sys.argv[1], device="cpu")
for _ in range(8):
    model.encode(texts, batch_size=8)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(rss)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--model-dir", help="sentence-transformers model folder [default: the bundled MiniLM]")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    from toolkit.corpus import load_corpus

    texts = load_corpus(limit=64)
    toolkit = [str(Path(sys.executable).with_name("toolkit")), "serve", args.artifact, "--port", str(args.port),
               "--log-level", "warning"]
    started = time.perf_counter()
    server = subprocess.Popen(toolkit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{args.port}"
    try:
        ready = None
        while time.perf_counter() - started < 60:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    ready = time.perf_counter() - started
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        if ready is None:
            raise SystemExit(f"server not ready in 60 s: {server.stderr.read().decode()[-500:] if server.poll() else ''}")
        with httpx.Client(base_url=url, timeout=60) as http:
            for text in texts:
                http.post("/v1/embeddings", json={"input": text}).raise_for_status()
        serve_rss = rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    model_dir = args.model_dir
    if model_dir is None:
        from toolkit.export.resolve import default_model_dir

        model_dir = str(default_model_dir())
    done = subprocess.run([sys.executable, "-c", _ST_SCRIPT, model_dir, json.dumps(texts)], capture_output=True,
                          text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    st_rss = int(done.stdout.strip().splitlines()[-1])
    print(f"toolkit serve ready in {ready:.2f} s")
    print(f"toolkit serve RSS after warm-up: {serve_rss / 1024:.0f} MiB")
    print(f"sentence-transformers process RSS: {st_rss / 1024:.0f} MiB")
    print(f"ratio: {serve_rss / st_rss:.2f}")


if __name__ == "__main__":
    main()
