"""Where a loaded server's time goes: ``toolkit serve`` under N clients x 1 text, sampled by py-spy.

    .venv/bin/python benchmarks/profile_server.py ARTIFACT [--clients 32] [--requests 1024] [--seconds 12]

Starts ``toolkit serve ARTIFACT`` on a free port, drives it with ``toolkit bench --server`` (the same keep-alive
load generator as the benchmarks), and meanwhile samples the server's Python threads with py-spy (active samples
only: a thread blocked in a wait is not counted). Prints, with the CPU's name: the load's figures, the share of
wall time each thread was busy and its top frames, the mean batch the batcher ran (``/metrics``), and the CPU
seconds the server used per request. onnxruntime's own threads are native: the batcher thread's time in
``Session.run`` is where they work.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=12.0, help="how long py-spy samples")
    args = parser.parse_args()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "toolkit"), "serve", args.artifact, "--port", str(port), "--log-level",
                               "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    raw = Path(tempfile.mkdtemp(prefix="profile-server-")) / "samples.txt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        before = httpx.get(url + "/metrics").text
        cpu0 = cpu_seconds(server.pid)
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "-p", str(server.pid), "-d", str(int(args.seconds)),
                                "-r", "200", "-f", "raw", "-o", str(raw), "--nonblocking", "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        started = time.monotonic()
        load = subprocess.run([str(BIN / "toolkit"), "bench", "--server", url, "--concurrency", str(args.clients),
                               "--requests", str(args.requests)], capture_output=True, text=True)
        load_s = time.monotonic() - started
        cpu1 = cpu_seconds(server.pid)
        after = httpx.get(url + "/metrics").text
        spy.wait(timeout=args.seconds + 30)
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"## `toolkit serve` under {args.clients} clients x 1 text, profiled\n\nCPU: {cpu_name()}\n")
    print("\n".join(line for line in load.stdout.splitlines() if line.startswith(("┃ clients", f"│ {args.clients} "))))

    def metric(text: str, name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    batches = metric(after, "toolkit_batch_size_count") - metric(before, "toolkit_batch_size_count")
    inputs = metric(after, "toolkit_batch_size_sum") - metric(before, "toolkit_batch_size_sum")
    print(f"\nbatches run: {batches:.0f}, mean batch {inputs / max(batches, 1):.1f} inputs; server CPU "
          f"{cpu1 - cpu0:.1f} s over {load_s:.1f} s of load ({(cpu1 - cpu0) / max(inputs, 1) * 1e3:.1f} ms CPU "
          f"per input, all its threads, onnxruntime's included)")
    busy: collections.Counter = collections.Counter()
    frames: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        thread = re.sub(r"thread \(\d+\): ", "", parts[0])
        busy[thread] += int(count)
        frames[thread][parts[-1]] += int(count)
    possible = args.seconds * 200
    for thread, samples in busy.most_common():
        print(f"\n{thread}: busy {samples / possible:.0%} of the sampled time")
        for frame, n in frames[thread].most_common(8):
            print(f"  {n / samples:5.1%}  {frame}")


if __name__ == "__main__":
    main()
