"""`toolkit serve` vs the peer server infinity (infinity-emb 0.0.78; its optimum engine on onnxruntime, and its
torch engine), side by side in one run, with one load generator, on the same model and texts.

    .venv/bin/python benchmarks/server_peers.py ARTIFACT MODEL_DIR [--optimum-dir DIR]
        [--infinity-python .cache/tools/infinity/bin/python] [--requests 1024] [--batched-requests 128]
        [--rounds 2] [--threads 2] [--json out.json]

ARTIFACT is the toolkit's export of MODEL_DIR (a sentence-transformers checkpoint: infinity's torch engine loads it);
``--optimum-dir`` is optimum's ONNX export of the same checkpoint (a folder with model.onnx, config.json and the
tokenizer: infinity's optimum engine loads it; without it the optimum engine is left out). infinity runs in its own
virtualenv (``--infinity-python``; it pins numpy < 2 and sentence-transformers < 4), offline (HF_HUB_OFFLINE=1,
DO_NOT_TRACK=1), as its users run it: ``infinity_emb v2 --model-id ... --engine optimum|torch --device cpu`` with
its defaults otherwise (batch size 32; ``--pooling-method mean`` for the optimum engine, which would pool the CLS
token on 'auto'). Its optimum engine is started from inside the optimum folder as ``--model-id .``: with optimum
2.x, infinity 0.0.78 hands optimum the ONNX file's full path for a local folder and optimum rejects it.

Threads: ``toolkit serve --threads T`` (its default ``--batch-workers``: 2 on a CPU with T >= 2, each batch on T/2
threads), and once more with ``--batch-workers 1`` (one batch at a time on all T threads: the default before
batch workers) as toolkit-1-worker; infinity has no threads option: its torch engine gets OMP_NUM_THREADS=T
(torch's intra-op pool), its optimum engine runs onnxruntime's default (one intra-op thread per physical core, so
T only where T is the number of cores: 2 on the 2-core VMs of benchmarks/README.md). The CPU seconds each server
used per second of load are printed beside its figures.

Each round starts each server in turn (one at a time: the load generator shares the cores) on a free loopback
port: toolkit, toolkit-1-worker, infinity-optimum, infinity-torch, waits for readiness (bounded), checks its vectors against the
toolkit's in-process ones (min cosine, 32 texts, encoding_format float), warms it up (64 x 1 text, 8 x 32 texts),
then drives it with toolkit.bench.server's keep-alive client (the one `toolkit bench --server` uses): 32 clients x
1 text per request (``--requests``), then 4 clients x 32 texts (``--batched-requests``), and stops it by its pid.
Every server gets the same body, OpenAI's plain one, on its own route (toolkit /v1/embeddings, infinity
/embeddings): ``{"input": [...], "model": NAME, "encoding_format": "base64"}``. Too-long inputs are cut by each
server: ``toolkit serve --auto-truncate`` and infinity's torch engine at the model's 256 tokens, infinity's optimum
engine at the config's max_position_embeddings (512 for MiniLM). Before the servers, with none running, each
round also times the toolkit in-process (``Embedder.embed`` in calls of 32) on the texts each load sent, with one
batch worker (T threads) and with two (T/2 threads each); the server is compared with the faster.
Printed: the CPU, per-round figures, medians (and best) over rounds, and the ratios toolkit / infinity-optimum,
toolkit / infinity-torch, toolkit / toolkit-1-worker and toolkit server / toolkit in-process.

The machine may not be ours alone: before each measured part the script waits (bounded) until other processes
use under 0.15 CPUs, and prints, for every measured span, the CPUs other processes kept busy meanwhile ('foreign',
from /proc/stat less this process and the server). On 2 cores a neighbour's job can halve a figure: with another
one-core job running, onnxruntime sessions here ran at about half their rate on one CPU's worth of time
(of onnxruntime's two intra-op threads, one was pinned to one core).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from toolkit.bench.machine import free_port
from toolkit.bench.server import bench_server
from toolkit.corpus import load_corpus
from toolkit.cpu import describe

READY_S = 180
SERVERS = ("toolkit", "toolkit-1-worker", "infinity-optimum", "infinity-torch")
LOADS = {"32x1": (32, 1), "4x32": (4, 32)}  # name: (clients, texts per request)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; steal included: a neighbour's time is not ours)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def self_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Foreign:
    """CPUs busy with anything but this process (the load generator, the in-process engine) and the server under
    test, over a span: another job on the machine, which the figures of that span would then not be alone with."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        server = cpu_seconds(self.pid) if self.pid else 0.0
        return time.perf_counter(), busy_seconds(), self_seconds(), server

    def cpus(self) -> tuple[float, float]:
        """(CPUs busy with other processes, CPUs busy with the server) since the start."""
        end = self._sample()
        wall = end[0] - self.start[0]
        busy, mine, server = (end[i] - self.start[i] for i in (1, 2, 3))
        return max(0.0, busy - mine - server) / wall, server / wall


def wait_quiet(pid: int | None = None, limit_s: float = 300, below: float = 0.15) -> float:
    """Wait (bounded) until other processes use less than ``below`` CPUs over 2 s; the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        span = Foreign(pid)
        time.sleep(2)
        if span.cpus()[0] < below:
            break
    else:
        print(f"  note: the machine did not go quiet in {limit_s:.0f} s; measuring anyway (see 'foreign' CPUs)")
    return time.monotonic() - start


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Server:
    """One server process, started in its own session and stopped by its pid."""

    def __init__(self, name: str, command: list[str], ready_path: str, route: str, log: Path,
                 cwd: Path | None = None, env: dict | None = None) -> None:
        self.name, self.command, self.ready_path, self.route, self.log = name, command, ready_path, route, log
        self.cwd, self.env = cwd, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*command, "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        started = time.monotonic()
        with open(self.log, "ab") as out:
            out.write(f"\n$ {' '.join(self.command)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env={**os.environ, **(self.env or {})}, start_new_session=True)
        deadline = started + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} was not ready in {READY_S} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def load(server: Server, clients: int, per_request: int, requests: int, model: str) -> dict:
    """One load level; beside the client's figures, the CPUs the server kept busy and those other processes did."""
    span = Foreign(server.proc.pid)
    result = bench_server(server.url, artifact=None, corpus=None, concurrency=(clients,), requests=requests,
                          inputs_per_request=per_request, threads=None, route=server.route,
                          body_fields={"model": model, "encoding_format": "base64"})
    foreign, cpu = span.cpus()
    row = result["rows"][0]
    return {"texts_per_s": row["sentences_per_s"], "requests_per_s": row["requests_per_s"], "p50_ms": row["p50_ms"],
            "p99_ms": row["p99_ms"], "requests": row["requests"], "server_cpus_busy": cpu, "foreign_cpus": foreign}


def agreement(server: Server, model: str, texts: list[str], reference: np.ndarray) -> float:
    """Min cosine of the server's float vectors against the toolkit's in-process ones on the same texts."""
    answer = httpx.post(server.url + server.route, json={"input": texts, "model": model, "encoding_format": "float"},
                        timeout=120)
    answer.raise_for_status()
    got = np.asarray([d["embedding"] for d in sorted(answer.json()["data"], key=lambda d: d["index"])], np.float64)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return float((got * ref).sum(axis=1).min())


def in_process(emb, texts: list[str]) -> tuple[float, float]:
    """Texts per second of ``Embedder.embed`` in calls of 32 over ``texts`` (one warm-up call first), and the CPUs
    other processes kept busy meanwhile."""
    emb.embed(texts[:32], truncate_prompt_tokens=-1)
    span = Foreign()
    start = time.perf_counter()
    for i in range(0, len(texts), 32):
        emb.embed(texts[i:i + 32], truncate_prompt_tokens=-1)
    return len(texts) / (time.perf_counter() - start), span.cpus()[0]


def cpu_flags() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                    "amx_tile", "amx_int8", "amx_bf16")
            return " ".join(f for f in line.split(":", 1)[1].split() if f in keep)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="the toolkit's artifact (fp32) of MODEL_DIR")
    parser.add_argument("model_dir", type=Path, help="the sentence-transformers checkpoint (infinity's torch engine)")
    parser.add_argument("--optimum-dir", type=Path, help="optimum's ONNX export of MODEL_DIR (infinity's optimum engine)")
    parser.add_argument("--infinity-python", default=".cache/tools/infinity/bin/python")
    parser.add_argument("--requests", type=int, default=1024, help="requests at 32 clients x 1 text")
    parser.add_argument("--batched-requests", type=int, default=128, help="requests at 4 clients x 32 texts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from toolkit.runtime import Embedder

    infinity_python = Path(args.infinity_python).absolute()
    infinity_cli = infinity_python.with_name("infinity_emb")
    if not infinity_cli.exists():
        raise SystemExit(f"no infinity_emb beside {infinity_python}: see benchmarks/README.md for its virtualenv")
    engines = list(SERVERS)
    if args.optimum_dir is None:
        engines.remove("infinity-optimum")
        print("no --optimum-dir: infinity's optimum engine left out")
    else:
        onnx_files = sorted(p.name for p in args.optimum_dir.glob("**/*.onnx"))
        if onnx_files != ["model.onnx"]:
            print(f"note: {args.optimum_dir} holds {onnx_files}; infinity picks one by its own rules")
    print(f"CPU: {describe()}; flags: {cpu_flags()}; {os.cpu_count()} CPUs; {args.threads} threads per server",
          flush=True)

    emb = Embedder(args.artifact, device="cpu", intra_op_threads=args.threads)
    emb2 = Embedder(args.artifact, device="cpu", intra_op_threads=args.threads, batch_workers=2)
    model = emb.card.name
    texts = {name: load_corpus(limit=max(args.requests if per == 1 else args.batched_requests * per, 64))
             for name, (_, per) in LOADS.items()}
    check_texts = texts["32x1"][:32]
    reference = np.asarray(emb.embed(check_texts, truncate_prompt_tokens=-1), np.float64)

    logs = Path(tempfile.mkdtemp(prefix="server-peers-"))
    infinity_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                    "INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": str(args.threads)}
    infinity = [str(infinity_python), str(infinity_cli), "v2", "--served-model-name", model, "--device", "cpu",
                "--host", "127.0.0.1", "--log-level", "warning"]

    def make(name: str) -> Server:
        if name.startswith("toolkit"):
            one = ["--batch-workers", "1"] if name == "toolkit-1-worker" else []
            return Server(name, [sys.executable, "-m", "toolkit.cli", "serve", str(args.artifact.absolute()),
                                 "--threads", str(args.threads), "--auto-truncate", "--log-level", "warning", *one],
                          "/ready", "/v1/embeddings", logs / f"{name}.log")
        if name == "infinity-optimum":
            return Server(name, [*infinity, "--model-id", ".", "--engine", "optimum", "--pooling-method", "mean"],
                          "/health", "/embeddings", logs / "infinity-optimum.log", cwd=args.optimum_dir.absolute(),
                          env=infinity_env)
        return Server(name, [*infinity, "--model-id", str(args.model_dir.absolute()), "--engine", "torch"],
                      "/health", "/embeddings", logs / "infinity-torch.log", env=infinity_env)

    rounds: list[dict] = []
    facts: dict[str, dict] = {}
    for r in range(args.rounds):
        wait_quiet()
        measured = {name: in_process(emb, texts[name]) for name in LOADS}
        measured2 = {name: in_process(emb2, texts[name]) for name in LOADS}
        this = {"in_process_1_worker": {k: v[0] for k, v in measured.items()},
                "in_process_2_workers": {k: v[0] for k, v in measured2.items()},
                "in_process": {k: max(measured[k][0], measured2[k][0]) for k in LOADS},
                "in_process_foreign_cpus": {k: max(measured[k][1], measured2[k][1]) for k in LOADS}}
        for label, figures in (("1 batch worker", measured), ("2 batch workers", measured2)):
            print(f"round {r + 1}: in-process calls of 32, {label}: "
                  + ", ".join(f"{v[0]:.1f} texts/s on the {k} texts (foreign {v[1]:.2f} CPUs)"
                              for k, v in figures.items()), flush=True)
        for name in engines:
            server = make(name)
            try:
                ready_s = server.start()
                fact = facts.setdefault(name, {"command": server.command, "cwd": str(server.cwd or Path.cwd())})
                fact.setdefault("ready_s", []).append(ready_s)
                if r == 0:
                    fact["min_cosine_vs_toolkit"] = agreement(server, model, check_texts, reference)
                load(server, 32, 1, 64, model)  # warm-up, not recorded
                load(server, 4, 32, 8, model)
                fact["threads_after_warmup"] = thread_count(server.proc.pid)
                this[name] = {"waited_for_quiet_s": wait_quiet(server.proc.pid)}
                for load_name, (clients, per) in LOADS.items():
                    n = args.requests if per == 1 else args.batched_requests
                    this[name][load_name] = load(server, clients, per, n, model)
            finally:
                server.stop()
            text = server.log_tail()
            if "Optimization failed" in text:
                fact["note"] = "infinity's own ORTOptimizer step failed; it ran the unoptimized model.onnx"
            row = this[name]
            print(f"  {name:>16}: ready in {ready_s:5.1f} s; 32 x 1: {row['32x1']['requests_per_s']:6.1f} req/s "
                  f"(p50 {row['32x1']['p50_ms']:6.1f} ms, server {row['32x1']['server_cpus_busy']:.2f} CPUs, foreign "
                  f"{row['32x1']['foreign_cpus']:.2f}); 4 x 32: {row['4x32']['texts_per_s']:6.1f} texts/s (p50 "
                  f"{row['4x32']['p50_ms']:6.1f} ms, server {row['4x32']['server_cpus_busy']:.2f} CPUs, foreign "
                  f"{row['4x32']['foreign_cpus']:.2f})", flush=True)
        rounds.append(this)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    summary: dict[str, dict] = {}
    for name in engines:
        summary[name] = {}
        for load_name in LOADS:
            key = "requests_per_s" if load_name == "32x1" else "texts_per_s"
            values = [rd[name][load_name][key] for rd in rounds]
            summary[name][load_name] = {key: med(values), "best": max(values), "rounds": values,
                                        "p50_ms": med([rd[name][load_name]["p50_ms"] for rd in rounds]),
                                        "server_cpus_busy": med([rd[name][load_name]["server_cpus_busy"]
                                                                 for rd in rounds]),
                                        "foreign_cpus_max": max(rd[name][load_name]["foreign_cpus"] for rd in rounds)}
    inproc = {k: med([rd["in_process"][k] for rd in rounds]) for k in LOADS}
    inproc_by = {workers: {k: med([rd[f"in_process_{workers}"][k] for rd in rounds]) for k in LOADS}
                 for workers in ("1_worker", "2_workers")}

    print(f"\nmedian over {args.rounds} round(s) (best in brackets); {args.requests} requests at 32 x 1, "
          f"{args.batched_requests} at 4 x 32")
    print("| server | 32 clients x 1 text, req/s | p50 ms | server CPUs | 4 clients x 32 texts, texts/s | p50 ms "
          "| server CPUs | min cosine vs toolkit |")
    print("|---|---|---|---|---|---|---|---|")
    for name in engines:
        a, b = summary[name]["32x1"], summary[name]["4x32"]
        print(f"| {name} | {a['requests_per_s']:.1f} ({a['best']:.1f}) | {a['p50_ms']:.0f} | {a['server_cpus_busy']:.2f} "
              f"| {b['texts_per_s']:.1f} ({b['best']:.1f}) | {b['p50_ms']:.0f} | {b['server_cpus_busy']:.2f} "
              f"| {facts[name]['min_cosine_vs_toolkit']:.7f} |")
    for workers, figures in inproc_by.items():
        print(f"| toolkit in-process, calls of 32, {workers.replace('_', ' ')} | {figures['32x1']:.1f} texts/s (the "
              f"32 x 1 texts) | - | - | {figures['4x32']:.1f} (the 4 x 32 texts) | - | - | - |")
    foreign = max([row[k]["foreign_cpus"] for rd in rounds for name, row in rd.items() if name in engines for k in LOADS]
                  + [v for rd in rounds for v in rd["in_process_foreign_cpus"].values()])
    print(f"other processes on the machine: at most {foreign:.2f} CPUs busy during any measured span")

    ratios: dict[str, float] = {}
    for load_name in LOADS:
        key = "requests_per_s" if load_name == "32x1" else "texts_per_s"
        for peer in [e for e in engines if e != "toolkit"]:
            per_round = [rd["toolkit"][load_name][key] / rd[peer][load_name][key] for rd in rounds]
            ratios[f"toolkit/{peer} {load_name}"] = med(per_round)
        per_round = [rd["toolkit"][load_name]["texts_per_s"] / rd["in_process"][load_name] for rd in rounds]
        ratios[f"toolkit server/in-process {load_name}"] = med(per_round)
    print("\nratios (median of the per-round ratios):")
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}x")
    for name, fact in facts.items():
        print(f"{name}: ready in {', '.join(f'{s:.1f}' for s in fact['ready_s'])} s; "
              f"{fact['threads_after_warmup']} threads after warm-up{'; ' + fact['note'] if 'note' in fact else ''}")
    print(f"server logs: {logs}")

    if args.json:
        args.json.write_text(json.dumps({
            "cpu": describe(), "cpu_flags": cpu_flags(), "threads": args.threads, "model": model,
            "requests": {"32x1": args.requests, "4x32": args.batched_requests}, "rounds": rounds,
            "summary": summary, "in_process_calls_of_32": inproc,
            "in_process_calls_of_32_by_workers": inproc_by, "ratios": ratios, "servers": facts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
