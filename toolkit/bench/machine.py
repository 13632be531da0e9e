"""What every bench result names: the machine it ran on; the one timer the engines share; a loopback port for the
servers a benchmark (or the test suite) starts."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from toolkit.cpu import cpu_info
from toolkit.settings import default_threads

__all__ = ["free_port", "machine_info", "time_calls"]


def machine_info() -> dict:
    """The CPU (model, ISA flags that matter for GEMMs: AVX2, AVX-512, VNNI, bf16, AMX), cores and Python."""
    return {**cpu_info(), "cores": default_threads(), "python": platform.python_version()}


def time_calls(fn, chunks) -> float:
    """Seconds ``fn`` takes over every chunk, one call each."""
    start = time.perf_counter()
    for chunk in chunks:
        fn(chunk)
    return time.perf_counter() - start


def free_port() -> int:
    """A loopback port free now, chosen at random below the kernel's ephemeral range (where every outgoing
    connection takes its local port, so a port picked there may be taken by a client socket before a slow server
    binds it: Ray Serve's proxy, while the suite's other pytest process runs) and above Ray's worker ports."""
    import random
    import socket

    low, high = 20000, 32767
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        high = min(high, low_ephemeral - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
