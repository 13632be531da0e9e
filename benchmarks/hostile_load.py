"""Hostile traffic against a real `toolkit serve` on loopback: what one client can cost the others.

    python benchmarks/hostile_load.py ARTIFACT [--json out.json]

Each scenario runs against a fresh server (so RSS is not carried over) while a probe polls /health every
20 ms; it reports the hostile request's status and time, the worst /health latency seen meanwhile, and the
server's peak RSS (psutil, sampled every 20 ms). All traffic goes to 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from statistics import median

import httpx
import psutil

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: str, *args: str) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", artifact, "--port", str(self.port),
                                      "--api-key", KEY, "--log-level", "error", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)
        httpx.post(self.url + "/v1/embeddings", json={"input": "warm up"}, headers=AUTH, timeout=60)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def watch(server: Server, hostile) -> dict:
    """Run ``hostile()`` (returns (status, note)) while polling /health and sampling RSS."""
    stop = threading.Event()
    health: list[float] = []
    rss = [server.ps.memory_info().rss]

    def poll() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                httpx.get(server.url + "/health", timeout=120)
            except httpx.HTTPError:
                pass
            health.append(time.perf_counter() - started)
            rss.append(server.ps.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    started = time.perf_counter()
    status, note = hostile()
    seconds = time.perf_counter() - started
    time.sleep(0.2)
    stop.set()
    thread.join()
    return {"status": status, "seconds": round(seconds, 3), "health_max_ms": round(max(health) * 1e3, 1),
            "rss_before_mib": round(rss[0] / 2**20), "rss_peak_mib": round(max(rss) / 2**20), "note": note}


def post(server: Server, path: str, body: dict, timeout: float = 300) -> tuple[int, str]:
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=timeout)
    return r.status_code, r.text[:120] if r.status_code != 200 else ""


def scenarios(artifact: str, only: set[str] | None = None) -> dict:
    big = "word " * (2 * 1024 * 1024)  # 10 MiB
    huge = "word " * (6 * 1024 * 1024)  # 30 MiB
    out = {}
    wide = ("--payload-limit", str(64 * 1024 * 1024))  # let the body through to measure the work behind it
    cases = [
        ("10MiB_text_default_limit", (), lambda s: post(s, "/v1/embeddings", {"input": big})),
        ("10MiB_text_no_truncation", wide, lambda s: post(s, "/v1/embeddings", {"input": big})),
        ("30MiB_text_truncate_-1", wide, lambda s: post(s, "/v1/embeddings", {"input": huge, "truncate_prompt_tokens": -1})),
        ("10MiB_v2_embed_truncate_END", wide, lambda s: post(s, "/v2/embed", {"texts": [big]})),
        ("10MiB_tokenize", wide, lambda s: post(s, "/tokenize", {"prompt": big})),
        ("chat_template_bomb_refused", (), lambda s: post(s, "/v1/embeddings", {
            "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x ' * 5000000 }}"})),
        ("chat_template_bomb_allowed", ("--allow-request-chat-template",), lambda s: post(s, "/v1/embeddings", {
            "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x ' * 5000000 }}"})),
        ("nested_range_template_allowed", ("--allow-request-chat-template",), lambda s: post(s, "/v1/embeddings", {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"})),
    ]
    for name, args, hostile in cases:
        if only and name not in only:
            continue
        server = Server(artifact, *args)
        try:
            out[name] = watch(server, lambda hostile=hostile, server=server: hostile(server))
        finally:
            server.close()
        print(name, out[name], flush=True)
    for name, run in (("overload_429", overload), ("ready_flood", ready_flood), ("stalled_connections", stalled)):
        if not only or name in only:
            out[name] = run(artifact)
            print(name, out[name], flush=True)
    return out


def overload(artifact: str) -> dict:
    """Two requests of 1400 long inputs (283k tokens each, under --max-request-tokens) hold 2800 of the 4096
    admitted inputs; a third of 1400 must be refused at once (429), not after the queue's work."""
    server = Server(artifact)
    texts = ["token " * 200] * 1400
    statuses = []
    try:
        threads = [threading.Thread(target=lambda: statuses.append(post(server, "/v1/embeddings", {
            "input": texts, "truncate_prompt_tokens": -1})[0])) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.perf_counter()
        status, text = post(server, "/v1/embeddings", {"input": ["one more"] * 1400})
        refused_in = time.perf_counter() - started
        for t in threads:
            t.join()
        return {"status": status, "answered_in_ms": round(refused_in * 1e3, 1), "note": text[:80],
                "in_flight_statuses": statuses}
    finally:
        server.close()


def ready_flood(artifact: str) -> dict:
    """One authenticated client's median latency, alone and while 8 unauthenticated clients hammer /ready."""
    server = Server(artifact)
    try:
        def client_median(n: int = 150) -> float:
            times = []
            with httpx.Client() as c:
                for _ in range(n):
                    started = time.perf_counter()
                    c.post(server.url + "/v1/embeddings", json={"input": "a short sentence"}, headers=AUTH)
                    times.append(time.perf_counter() - started)
            return median(times) * 1e3

        alone = client_median()
        stop = threading.Event()
        counts = [0] * 8

        def flood(k: int) -> None:
            with httpx.Client() as c:
                while not stop.is_set():
                    c.get(server.url + "/ready")
                    counts[k] += 1

        floods = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
        for t in floods:
            t.start()
        flooded = client_median()
        stop.set()
        for t in floods:
            t.join()
        return {"median_ms_alone": round(alone, 2), "median_ms_during_flood": round(flooded, 2),
                "ready_requests_during_flood": sum(counts)}
    finally:
        server.close()


def stalled(artifact: str) -> dict:
    """1000 connections that never send a request: how long the server holds them, and /health meanwhile."""
    server = Server(artifact)
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
        for s in socks:
            s.settimeout(0.01)
        started = time.monotonic()
        worst = 0.0
        open_count = len(socks)
        while open_count and time.monotonic() - started < 30:
            t0 = time.perf_counter()
            httpx.get(server.url + "/health", timeout=30)
            worst = max(worst, time.perf_counter() - t0)
            open_count = 0
            for s in socks:
                try:
                    if s.recv(1) != b"":
                        open_count += 1
                except TimeoutError:
                    open_count += 1
                except OSError:
                    pass
            time.sleep(0.5)
        for s in socks:
            s.close()
        return {"all_closed_after_s": round(time.monotonic() - started, 1) if not open_count else None,
                "still_open": open_count, "health_max_ms": round(worst * 1e3, 1)}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    args = parser.parse_args()
    result = scenarios(args.artifact, set(args.only) if args.only else None)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
