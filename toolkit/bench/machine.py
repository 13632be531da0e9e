"""What every bench result names: the machine it ran on; and the one timer the engines share."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from toolkit.settings import default_threads

__all__ = ["machine_info", "time_calls"]


def machine_info() -> dict:
    """The CPU (model, ISA flags that matter for GEMMs: AVX2, AVX-512, VNNI, bf16, AMX), cores and Python."""
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx", "avx2")))
    return {"cpu": model, "cores": default_threads(), "isa": isa, "python": platform.python_version()}


def time_calls(fn, chunks) -> float:
    """Seconds ``fn`` takes over every chunk, one call each."""
    start = time.perf_counter()
    for chunk in chunks:
        fn(chunk)
    return time.perf_counter() - start
