"""The CPU this process runs on: its model and the ISA flags that decide which GEMM kernels onnxruntime picks
(AVX2, AVX-512, VNNI, bf16, AMX). Bench results and int8 artifacts name it: int8 kernels differ between them
(AVX2's u8s8 kernel saturates where VNNI's does not), so an int8 artifact records what its gate ran on."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["GEMM_FLAGS", "cpu_info", "describe", "has_vnni", "u8s8_saturates"]

GEMM_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx")


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """``{"cpu": model name, "isa": [GEMM-relevant flags]}`` (from /proc/cpuinfo; the platform's name elsewhere)."""
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and model == platform.processor():
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model or "unknown", "isa": sorted(f for f in flags if f.startswith(GEMM_FLAGS))}


def describe(info: dict | None = None) -> str:
    """One line: the model and its flags ("AMD EPYC 9B14 (avx2 avx512_vnni ...)")."""
    info = info or cpu_info()
    return f"{info['cpu']} ({' '.join(info['isa']) or 'no AVX2'})"


def has_vnni(isa: list[str] | str) -> bool:
    """VNNI int8 dot products (AVX-512 VNNI or AVX-VNNI): onnxruntime's u8s8 kernels then do not saturate."""
    return any(flag in isa for flag in ("avx512_vnni", "avx_vnni"))


def u8s8_saturates(isa: list[str] | str) -> bool:
    """Whether onnxruntime's u8s8 GEMM (dynamic int8: uint8 activations x int8 weights) saturates on this ISA.

    Without VNNI, MLAS multiplies with ``vpmaddubsw`` (AVX2, and AVX-512BW): the two products of each adjacent
    pair along K, ``a[2j] * w[2j] + a[2j+1] * w[2j+1]``, are added in 16 bits and clamped to [-32768, 32767]
    before the 32-bit accumulation. Two large products (an activation far from its zero point times a weight
    near +-127) lose the excess. VNNI's ``vpdpbusd`` adds the four products in 32 bits: exact."""
    return not has_vnni(isa) and any(flag in isa for flag in ("avx2", "avx512bw"))
