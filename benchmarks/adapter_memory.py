"""Memory and speed of N LoRA adapters on one base artifact, against N separate merged models.

    python benchmarks/adapter_memory.py [--adapters 8] [--rank 16] [--out DIR] [--served | --served-only]

Makes N random PEFT LoRA adapters (query + value, rank R, seeded 0..N-1) of all-MiniLM-L6-v2's BertModel,
exports the base once with all of them (`--adapter NAME=DIR` each) and once plain, then:

- resident memory, each in a fresh subprocess, after opening and embedding 32 texts: the plain artifact;
  the adapter artifact with its N adapters opened and each used once;
- throughput (texts/s, 256 short corpus texts in one `embed` call, best of 3, interleaved in one process): plain,
  adapter artifact with no adapter active, adapter artifact with one active.

`--served` adds, and `--served-only` measures only, real `toolkit serve` processes on loopback ports: one for the
plain artifact, one for the base exported with `--served-adapters` K adapters (default 4; the first K of the same
adapters), both running side by side:

- each server's resident memory (VmRSS, VmHWM, its whole process tree) after the same warm-up requests, and again
  after the load below;
- throughput in the same run: `--clients` keep-alive connections send `--requests` requests of
  `--texts-per-request` short corpus texts each, for the plain server's base; the adapter server's base name; ONE
  adapter; and the K adapters round-robin (a batch holds one adapter's rows, so mixed load makes smaller batches).
  The four loads run in `--rounds` interleaved rounds; the mean batch size comes from each server's /metrics.

Exports and PEFT folders are reused when `--out` already holds them (same rank and adapters). Prints Markdown
tables, the CPU and the command line.
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
BASE_NAME = "minilm"  # the served name of each server's base model (--served-model-name)


def short_texts(n: int) -> list[str]:
    """The first ``n`` corpus texts of at most SHORT characters."""
    from toolkit.corpus import load_corpus

    return [text for text in load_corpus() if len(text) <= SHORT][:n]


def proc_status(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
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
    """N PEFT LoRA adapter folders with random (nonzero) weights; returns their NAME=DIR options. A folder already
    in ``work`` (same seed and rank: same weights) is reused."""
    options = []
    for i in range(n):
        out = work / "peft" / f"r{rank}" / f"a{i}"
        if not (out / "adapter_config.json").is_file():
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModel

            torch.manual_seed(i)  # each adapter its own weights
            model = AutoModel.from_pretrained(folder)  # a fresh base each time: get_peft_model edits it in place
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(str(out))
        options.append(f"a{i}={out}")
    return options


def export(output: Path, adapters: tuple[str, ...]) -> float | None:
    """Export the bundled MiniLM to ``output`` (with ``adapters``); returns the seconds it took, or None where
    ``output`` already holds this export (a stamp beside it records the adapters it was made with)."""
    stamp = output.with_name(output.stem + ".bench.json")
    key = json.dumps(sorted(adapters))
    if output.is_file() and stamp.is_file() and stamp.read_text() == key:
        return None
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_model(None, ExportOptions(output=output, adapters=adapters))
    seconds = time.perf_counter() - started
    stamp.write_text(key)
    return seconds


def seconds_text(seconds: float | None) -> str:
    return "reused from --out" if seconds is None else f"{seconds:.1f} s"


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
    """The CPU's model name and its int8-relevant vector extensions."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    have = [flag for flag in ("avx2", "avx512f", "avx512_vnni") if flag in flags]
    return f"{name}, {os.cpu_count()} cores, {' + '.join(have) or 'no AVX2'}"


# ---- served mode: real `toolkit serve` processes -------------------------------------------------------------------



class Server:
    """A real `toolkit serve ARTIFACT` on a free loopback port, its output in ``log``; ``stop`` kills it by pid."""

    def __init__(self, artifact: Path, log: Path) -> None:
        from toolkit.bench.machine import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:  # the child keeps its own descriptor
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "toolkit.cli", "serve", str(artifact), "--port", str(self.port),
                 "--served-model-name", BASE_NAME, "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.ready_seconds = self._wait_ready(started)

    def _wait_ready(self, started: float, limit: float = 180) -> float:
        import httpx

        while time.perf_counter() - started < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"toolkit serve exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.url} not ready in {limit:.0f} s:\n{self.log.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        """The server process and every descendant (the local engine is one process; this checks it)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                pass
        return sorted(set(found))

    def memory(self) -> dict:
        """VmRSS summed over the process tree, and the server process's own VmRSS and VmHWM, in bytes."""
        pids = self.pids()
        tree = 0
        for pid in pids:
            try:
                tree += proc_status("VmRSS", pid)
            except (OSError, KeyError):
                pass
        return {"tree_rss": tree, "rss": proc_status("VmRSS", self.proc.pid),
                "peak": proc_status("VmHWM", self.proc.pid), "processes": len(pids)}

    def batch_sizes(self) -> tuple[float, int]:
        """(rows in all batches so far, batches so far), from /metrics' toolkit_batch_size histogram."""
        import httpx

        rows = batches = 0
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("toolkit_batch_size_sum"):
                rows += float(line.split()[-1])
            elif line.startswith("toolkit_batch_size_count"):
                batches += int(float(line.split()[-1]))
        return rows, batches

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def post_all(url: str, bodies: list[bytes], clients: int, deadline_s: float = 240, timeout_s: float = 60) -> float:
    """Send ``bodies`` to ``url``'s /v1/embeddings over ``clients`` keep-alive connections (each sends its next
    request when the previous answer is in); the wall seconds. Every request must answer 200 within
    ``timeout_s``; the whole load must finish within ``deadline_s``."""
    import asyncio
    from urllib.parse import urlsplit

    # `toolkit bench --server`'s minimal keep-alive client: little CPU per request on the server's cores
    from toolkit.bench.server import _Connection

    parts = urlsplit(url)

    async def load() -> float:
        failures: list[str] = []

        async def client(k: int) -> None:
            conn = _Connection(parts.hostname, parts.port, {})
            try:
                for i in range(k, len(bodies), clients):
                    try:
                        status = await asyncio.wait_for(conn.post("/v1/embeddings", bodies[i]), timeout_s)
                    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                        status = f"{type(exc).__name__}"
                        await conn.close()
                    if status != 200:
                        failures.append(f"request {i}: {status}")
            finally:
                await conn.close()

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(clients))), deadline_s)
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(bodies)} requests failed, e.g. {failures[:3]}")
        return time.perf_counter() - started

    return asyncio.run(load())


def embeddings(url: str, model: str, texts: list[str]):
    """One /v1/embeddings call's vectors (float lists), for the sanity check."""
    import httpx

    answer = httpx.post(url + "/v1/embeddings", json={"model": model, "input": texts}, timeout=60)
    answer.raise_for_status()
    return [row["embedding"] for row in answer.json()["data"]]


def served(plain: Path, lora: Path, names: list[str], *, clients: int, requests: int, per_request: int,
           rounds: int, work: Path) -> dict:
    """Both servers side by side: memory after the same warm-up, then the four loads interleaved, then memory
    again. Both servers are killed at the end, whatever happens."""
    import httpx

    texts = short_texts(requests * per_request)

    def bodies(models: list[str], start: int, count: int) -> list[bytes]:
        return [json.dumps({"model": models[i % len(models)], "encoding_format": "base64",
                            "input": [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]}).encode()
                for i in range(start, start + count)]

    servers: dict[str, Server] = {}
    try:
        servers["plain"] = Server(plain, work / "serve-plain.log")
        servers["lora"] = Server(lora, work / "serve-lora.log")
        plain_url, lora_url = servers["plain"].url, servers["lora"].url
        listed = sorted(m["id"] for m in httpx.get(lora_url + "/v1/models", timeout=30).json()["data"])
        if listed != sorted([BASE_NAME, *names]):
            raise RuntimeError(f"the adapter server lists {listed}, expected {[BASE_NAME, *names]}")
        # sanity: each adapter's vector differs from the base's on the same text
        probe = texts[:1]
        base_vector = embeddings(lora_url, BASE_NAME, probe)[0]
        for name in names:
            if embeddings(lora_url, name, probe)[0] == base_vector:
                raise RuntimeError(f"adapter {name} returned the base model's vector")

        # the same warm-up requests for both: WARM requests of 8 texts per served name of the adapter server
        warm = 4
        lora_warm = [body for model in [BASE_NAME, *names] for body in bodies([model], 0, warm)]
        plain_warm = bodies([BASE_NAME], 0, warm * (1 + len(names)))
        post_all(plain_url, plain_warm, 1)
        post_all(lora_url, lora_warm, 1)
        time.sleep(1)
        warmed = {key: server.memory() for key, server in servers.items()}

        loads = {"plain server, base": (plain_url, [BASE_NAME]),
                 "adapter server, base name": (lora_url, [BASE_NAME]),
                 f"adapter server, one adapter ({names[0]})": (lora_url, names[:1]),
                 f"adapter server, {len(names)} adapters round-robin": (lora_url, names)}
        seconds = dict.fromkeys(loads, 0.0)
        batches = {label: [0.0, 0] for label in loads}
        per_round = requests // rounds
        for r in range(rounds):
            for label, (url, models) in loads.items():
                server = servers["plain" if url == plain_url else "lora"]
                rows0, count0 = server.batch_sizes()
                seconds[label] += post_all(url, bodies(models, r * per_round, per_round), clients)
                rows1, count1 = server.batch_sizes()
                batches[label][0] += rows1 - rows0
                batches[label][1] += count1 - count0
        time.sleep(1)
        loaded = {key: server.memory() for key, server in servers.items()}
        return {"ready": {key: s.ready_seconds for key, s in servers.items()}, "warmed": warmed, "loaded": loaded,
                "rates": {label: rounds * per_round * per_request / s for label, s in seconds.items()},
                "seconds": seconds, "mean_batch": {label: rows / max(n, 1) for label, (rows, n) in batches.items()},
                "requests": rounds * per_round}
    finally:
        for server in servers.values():
            server.stop()


def print_served(result: dict, k: int, sizes: dict, args: argparse.Namespace) -> None:
    warmed, loaded = result["warmed"], result["loaded"]
    plain_mem, lora_mem = warmed["plain"], warmed["lora"]
    print(f"### Served: `toolkit serve`, the plain artifact vs the base with {k} adapters (two servers side by side)\n")
    print(f"Ready in {result['ready']['plain']:.1f} s (plain) and {result['ready']['lora']:.1f} s ({k} adapters); "
          f"processes per server: {plain_mem['processes']} and {lora_mem['processes']} (RSS is the process tree's).\n")
    print("| server | RSS after warm-up | after the load | peak (VmHWM) |")
    print("|---|---|---|---|")
    print(f"| plain artifact ({sizes['plain'] / MIB:.1f} MiB on disk) | {plain_mem['tree_rss'] / MIB:.1f} MiB "
          f"| {loaded['plain']['tree_rss'] / MIB:.1f} MiB | {loaded['plain']['peak'] / MIB:.1f} MiB |")
    print(f"| base + {k} adapters ({sizes['lora'] / MIB:.1f} MiB + {k} x {sizes['adapter'] / 1024:.0f} KiB) "
          f"| {lora_mem['tree_rss'] / MIB:.1f} MiB | {loaded['lora']['tree_rss'] / MIB:.1f} MiB "
          f"| {loaded['lora']['peak'] / MIB:.1f} MiB |")
    after_warm = lora_mem["tree_rss"] - plain_mem["tree_rss"]
    after_load = loaded["lora"]["tree_rss"] - loaded["plain"]["tree_rss"]
    print(f"| difference | {after_warm / MIB:+.1f} MiB ({after_warm / k / MIB:+.2f} per adapter) "
          f"| {after_load / MIB:+.1f} MiB ({after_load / k / MIB:+.2f} per adapter) | |\n")
    print(f"Warm-up: 4 requests of {args.texts_per_request} texts per served name ({k + 1} names), the same "
          f"{4 * (k + 1)} requests to the plain server.\n")
    rates, mean_batch = result["rates"], result["mean_batch"]
    labels = list(rates)
    print(f"| {args.clients} clients, {result['requests']} requests x {args.texts_per_request} corpus texts "
          f"(<= {SHORT} chars), {args.rounds} interleaved rounds | texts/s | mean batch (rows) |")
    print("|---|---|---|")
    for label in labels:
        print(f"| {label} | {rates[label]:.1f} | {mean_batch[label]:.1f} |")
    plain_rate, base_rate, one_rate, mixed_rate = (rates[label] for label in labels)
    print(f"\nmixed / one adapter: **{mixed_rate / one_rate:.3f}x**; one adapter / base name (same server): "
          f"**{one_rate / base_rate:.3f}x**; adapter server's base / plain server: {base_rate / plain_rate:.3f}x\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="How many LoRA adapters (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="Their LoRA rank r (default 16; alpha = 2r)")
    parser.add_argument("--out", type=Path, help="Work folder (default: a new temporary folder); exports and PEFT "
                        "folders already in it are reused")
    parser.add_argument("--served", action="store_true", help="Also measure two real `toolkit serve` processes")
    parser.add_argument("--served-only", action="store_true", help="Only the served measurements")
    parser.add_argument("--served-adapters", type=int, default=4, help="Adapters on the served artifact (default 4)")
    parser.add_argument("--clients", type=int, default=8, help="Served: concurrent connections (default 8)")
    parser.add_argument("--requests", type=int, default=512, help="Served: requests per load (default 512)")
    parser.add_argument("--texts-per-request", type=int, default=8, help="Served: texts per request (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="Served: interleaved rounds the requests are split "
                        "into (default 2)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh-subprocess memory probe
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    in_process, with_served = not args.served_only, args.served or args.served_only
    if with_served and not (1 <= args.served_adapters and 1 <= args.rounds <= args.requests and args.clients >= 1):
        parser.error("--served-adapters, --clients and --rounds must be >= 1, --rounds <= --requests")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])  # the interpreter, as run from here
    work = args.out or Path(tempfile.mkdtemp(prefix="adapter-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    from toolkit.model_source import default_model_dir
    from toolkit.runtime.artifact import adapter_path

    n, k = args.adapters, args.served_adapters
    options = make_adapters(default_model_dir(), max(n if in_process else 0, k if with_served else 0), args.rank, work)
    plain = work / "plain" / "minilm.onnx"
    plain_seconds = export(plain, ())
    print(f"## LoRA adapters on one base artifact: all-MiniLM-L6-v2, rank {args.rank} (query, value)\n")
    print(f"CPU: {cpu_name()}\n\nCommand: `{command}`\n")

    if in_process:
        lora = work / "lora" / "minilm.onnx"
        lora_seconds = export(lora, tuple(options[:n]))
        files = {f"a{i}": adapter_path(lora, f"a{i}").stat().st_size for i in range(n)}
        base_size, lora_size = artifact_bytes(plain), artifact_bytes(lora)

        # three fresh processes each, interleaved; the median of each figure (RSS moves by a few MiB run to run)
        runs = [(child(plain), child(lora)) for _ in range(3)]
        mem_plain, mem_lora = (median_of([r[j] for r in runs]) for j in (0, 1))
        speed = throughput(plain, lora, "a0")

        per_adapter = (mem_lora["rss"] - mem_plain["rss"]) / n
        print(f"### In process: {n} adapters\n")
        print(f"Export: plain {seconds_text(plain_seconds)}; with {n} adapters (one call, each checked against PEFT) "
              f"{seconds_text(lora_seconds)}\n")
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
        print()

    if with_served:
        target = work / "lora" / "minilm.onnx" if in_process and n == k else work / f"served-{k}" / "minilm.onnx"
        served_seconds = export(target, tuple(options[:k]))
        names = [f"a{i}" for i in range(k)]
        sizes = {"plain": artifact_bytes(plain), "lora": artifact_bytes(target),
                 "adapter": adapter_path(target, names[0]).stat().st_size}
        print(f"Exports: plain {seconds_text(plain_seconds)}; with {k} adapters {seconds_text(served_seconds)}\n")
        started = time.perf_counter()
        result = served(plain, target, names, clients=args.clients, requests=args.requests,
                        per_request=args.texts_per_request, rounds=args.rounds, work=work)
        print_served(result, k, sizes, args)
        print(f"Served part: {time.perf_counter() - started:.0f} s (start-up, warm-up, loads)\n")
    print(f"Work folder: {work}")


if __name__ == "__main__":
    main()
