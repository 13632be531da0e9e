"""What every bench result names: the machine it ran on; and the one timer the engines share."""

from __future__ import annotations

import platform
import time

from toolkit.cpu import cpu_info
from toolkit.settings import default_threads

__all__ = ["machine_info", "time_calls"]


def machine_info() -> dict:
    """The CPU (model, ISA flags that matter for GEMMs: AVX2, AVX-512, VNNI, bf16, AMX), cores and Python."""
    return {**cpu_info(), "cores": default_threads(), "python": platform.python_version()}


def time_calls(fn, chunks) -> float:
    """Seconds ``fn`` takes over every chunk, one call each."""
    start = time.perf_counter()
    for chunk in chunks:
        fn(chunk)
    return time.perf_counter() - start
