"""Ray Serve's cost and its scaling, measured in one run with one load generator (toolkit.bench.server's
minimal keep-alive client, the one `toolkit bench --server` uses):

1. `toolkit serve ARTIFACT --threads T` direct (one process, uvicorn);
2. the same artifact as ONE Ray Serve replica of T CPUs behind Ray Serve's HTTP proxy (the proxy's cost);
3. TWO replicas (2 vs 1: what a second replica buys on this machine).

    python benchmarks/ray_serve_bench.py all-MiniLM-L6-v2.onnx --json benchmarks/ray-serve.json

Every figure names the CPU. Loopback only; every server and the local Ray are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from toolkit.bench.server import bench_server
from toolkit.cpu import describe


def _wait_ready(url: str, proc: subprocess.Popen | None = None, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stdout.read()[-2000:] if proc.stdout else ''}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready in {seconds} s")


def _load(url: str, args) -> list[dict]:
    rows = []
    for clients, per_request in ((args.clients, 1), (4, 32)):
        result = bench_server(url, artifact=None, corpus=None, concurrency=(clients,), requests=args.requests,
                              inputs_per_request=per_request, threads=None)
        row = result["rows"][0]
        rows.append({"load": f"{clients} clients x {per_request}", "texts_per_s": row["sentences_per_s"],
                     "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads = CPUs per replica")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600, help="requests per load level")
    parser.add_argument("--port", type=int, default=18600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"CPU: {describe()}; {args.artifact.name}; {args.threads} thread(s) per server / replica", flush=True)
    results: dict[str, list[dict]] = {}

    url = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", str(args.artifact), "--port",
                             str(args.port), "--threads", str(args.threads), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(url, proc)
        results["direct"] = _load(url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    import ray
    from ray import serve

    from toolkit.server.ray import DEPLOYMENT, ScaleOptions, build_app
    from toolkit.settings import RuntimeOptions, ServerOptions

    ray.init(num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port + 1})
        url = f"http://127.0.0.1:{args.port + 1}"
        for replicas in (1, 2):
            app = build_app([args.artifact], [], ServerOptions(), RuntimeOptions(intra_op_threads=args.threads),
                            ScaleOptions(replicas=replicas, replica_cpus=float(args.threads)))
            serve.run(app, name=DEPLOYMENT, route_prefix="/")
            _wait_ready(url)
            results[f"ray x{replicas}"] = _load(url, args)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{'load':<20} {'direct':>10} {'ray x1':>10} {'ray x2':>10} {'x1/direct':>10} {'x2/x1':>8}  (texts/s)")
    for i, row in enumerate(results["direct"]):
        one, two = results["ray x1"][i], results["ray x2"][i]
        print(f"{row['load']:<20} {row['texts_per_s']:>10.1f} {one['texts_per_s']:>10.1f} {two['texts_per_s']:>10.1f} "
              f"{one['texts_per_s'] / row['texts_per_s']:>10.2f} {two['texts_per_s'] / one['texts_per_s']:>8.2f}")
        print(f"{'  p50 / p99 ms':<20} {row['p50_ms']:>5.1f}/{row['p99_ms']:<5.0f}{one['p50_ms']:>5.1f}/{one['p99_ms']:<5.0f}"
              f"{two['p50_ms']:>5.1f}/{two['p99_ms']:<5.0f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "artifact": args.artifact.name, "threads": args.threads,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
