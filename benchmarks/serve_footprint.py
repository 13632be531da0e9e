"""Start-up time and memory of `toolkit serve` vs a sentence-transformers process on the same model.

    .venv/bin/python benchmarks/serve_footprint.py ARTIFACT [--model-dir DIR] [--port 8011]

Prints: seconds from launching `toolkit serve` to /ready answering 200; the server's RSS after
warm-up (64 single-sentence requests); the RSS of a minimal sentence-transformers server (the
standard library's http.server, the lightest Python server there is) after the same requests;
and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_ST_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        vectors = model.encode([body["input"]], convert_to_numpy=True)
        out = json.dumps({"data": [{"embedding": v.tolist()} for v in vectors]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _serve_and_measure(command: list[str], url: str, ready_path: str, texts: list[str]) -> tuple[float, int]:
    """Start a server, wait until ``ready_path`` answers 200, send each text once; (seconds to ready, RSS KiB)."""
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        ready = None
        while time.perf_counter() - started < 120:
            try:
                if httpx.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                    ready = time.perf_counter() - started
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"{command[0]} exited: {server.stderr.read().decode()[-500:]}")
            time.sleep(0.02)
        if ready is None:
            raise SystemExit(f"{url} not ready in 120 s")
        with httpx.Client(base_url=url, timeout=60) as http:
            for text in texts:
                http.post("/v1/embeddings", json={"input": text}).raise_for_status()
        return ready, rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--model-dir", help="sentence-transformers model folder [default: the bundled MiniLM]")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--serve-args", default="", help="more `toolkit serve` options, one string: "
                        "--serve-args='--batch-workers 1'")
    args = parser.parse_args()
    from toolkit.corpus import load_corpus

    texts = load_corpus(limit=64)
    toolkit = [str(Path(sys.executable).with_name("toolkit")), "serve", args.artifact, "--port", str(args.port),
               "--log-level", "warning", *shlex.split(args.serve_args)]
    ready, serve_rss = _serve_and_measure(toolkit, f"http://127.0.0.1:{args.port}", "/ready", texts)
    model_dir = args.model_dir
    if model_dir is None:
        from toolkit.export.resolve import default_model_dir

        model_dir = str(default_model_dir())
    st_server = [sys.executable, "-c", _ST_SERVER, model_dir, str(args.port + 1)]
    _, st_rss = _serve_and_measure(st_server, f"http://127.0.0.1:{args.port + 1}", "/", texts)
    print(f"toolkit serve ready in {ready:.2f} s")
    print(f"toolkit serve RSS after warm-up: {serve_rss / 1024:.0f} MiB")
    print(f"sentence-transformers process RSS: {st_rss / 1024:.0f} MiB")
    print(f"ratio: {serve_rss / st_rss:.2f}")


if __name__ == "__main__":
    main()
