"""Output conversion shared by the Python API and every server route.

- base64 / raw bytes of float32, float16 or bfloat16, native / little / big endian
  (vLLM's ``embed_dtype`` and ``endianness``);
- Cohere's ``int8`` / ``uint8``: scalar quantization of the unit vector over a
  range calibrated at export time (the manifest's ``quantization_range``: the
  0.5th-99.5th percentile of components on the probe corpus), clipped;
- ``binary`` / ``ubinary``: sign bits packed MSB-first, binary = ubinary - 128.
"""

from __future__ import annotations

import base64
import sys

import numpy as np

from toolkit.errors import RequestError

__all__ = ["EMBED_DTYPES", "ENCODING_FORMATS", "ENDIANNESS", "pack_bits", "pack_rows", "quantize", "to_base64",
           "to_bytes", "to_dtype", "to_fp8"]

EMBED_DTYPES = ("float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2")
ENDIANNESS = ("native", "little", "big")
ENCODING_FORMATS = ("float", "base64", "bytes", "bytes_only")


def _fp8_grid(man_bits: int, bias: int, finite_codes: int) -> np.ndarray:
    """Values of the non-negative fp8 codes 0..finite_codes, the last being the first one past the maximum."""
    codes = np.arange(finite_codes + 1)
    exponent, mantissa = codes >> man_bits, codes & ((1 << man_bits) - 1)
    fraction = mantissa / (1 << man_bits)
    return np.where(exponent == 0, fraction * 2.0 ** (1 - bias), (1 + fraction) * 2.0 ** (exponent - bias))


# (grid, code past the maximum, code for NaN): e4m3fn has no infinity and saturates at 448 (as torch casts);
# e5m2 overflows to inf
_FP8 = {"fp8_e4m3": (_fp8_grid(3, 7, 127), 0x7E, 0x7F), "fp8_e5m2": (_fp8_grid(2, 15, 124), 0x7C, 0x7F)}


def to_fp8(vectors: np.ndarray, embed_dtype: str) -> np.ndarray:
    """float32 -> fp8 bit patterns (uint8), round to nearest, ties to even, as torch's float8 casts."""
    grid, overflow_code, nan_code = _FP8[embed_dtype]
    x = np.asarray(vectors, dtype=np.float64)
    a = np.abs(x)
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    up, down = grid[hi] - a, a - grid[lo]
    code = np.where((up < down) | ((up == down) & (hi % 2 == 0)), hi, lo)
    code = np.where((a > grid[-1]) | (code == len(grid) - 1), overflow_code, code)
    code = np.where(np.isnan(x), nan_code, code).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)


def to_dtype(vectors: np.ndarray, embed_dtype: str = "float32", endianness: str = "native") -> np.ndarray:
    """(n, d) float32 -> (n, d) array of ``embed_dtype`` in the asked byte order."""
    match embed_dtype:
        case "float32":
            out = np.ascontiguousarray(vectors, dtype=np.float32)
        case "float16":
            out = vectors.astype(np.float16)
        case "bfloat16":  # round-to-nearest-even on the top 16 bits of float32
            bits = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        case "fp8_e4m3" | "fp8_e5m2":  # one byte: endianness does not apply
            return to_fp8(vectors, embed_dtype)
        case _:
            raise RequestError(f"embed_dtype '{embed_dtype}' is not one of: {', '.join(EMBED_DTYPES)}", param="embed_dtype")
    match endianness:
        case "native":
            return out
        case "little" | "big":
            if (sys.byteorder != endianness) and out.dtype.itemsize > 1:
                return out.byteswap()
            return out
        case _:
            raise RequestError(f"endianness '{endianness}' is not one of: {', '.join(ENDIANNESS)}", param="endianness")


def to_base64(vectors: np.ndarray, embed_dtype: str = "float32", endianness: str = "native") -> list[str]:
    """One base64 string per row."""
    arr = to_dtype(vectors, embed_dtype, endianness)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in arr]


def to_bytes(vectors: np.ndarray, embed_dtype: str = "float32", endianness: str = "native") -> bytes:
    """All rows back to back (row-major), for ``encoding_format=bytes``."""
    return to_dtype(vectors, embed_dtype, endianness).tobytes()


def pack_rows(rows, embed_dtype: str = "float32", endianness: str = "native") -> tuple[bytes, list[dict]]:
    """Rows of any shape (vectors, per-token matrices) back to back, and vLLM's per-item metadata for
    ``encoding_format=bytes``: ``index``, ``embed_dtype``, ``endianness``, ``start``, ``end`` (byte offsets),
    ``shape``."""
    chunks, items, at = [], [], 0
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.float32)
        data = to_dtype(row.reshape(1, -1), embed_dtype, endianness).tobytes()
        items.append({"index": i, "embed_dtype": embed_dtype, "endianness": endianness, "start": at,
                      "end": at + len(data), "shape": list(row.shape)})
        chunks.append(data)
        at += len(data)
    return b"".join(chunks), items


def pack_bits(vectors: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, ceil(d/8)) uint8: bit = component > 0, MSB first."""
    return np.packbits(vectors > 0, axis=-1)


def quantize(vectors: np.ndarray, kind: str, value_range: tuple[float, float], native_dim: int) -> np.ndarray:
    """Cohere's embedding types for UNIT vectors.

    ``value_range`` is calibrated on ``native_dim``-wide vectors; a truncated,
    renormalized vector of d dims has components ~sqrt(native_dim / d) larger,
    so the range is scaled by that factor.
    """
    match kind:
        case "ubinary":
            return pack_bits(vectors)
        case "binary":
            return (pack_bits(vectors).astype(np.int16) - 128).astype(np.int8)
        case "uint8" | "int8":
            lo, hi = value_range
            scale = np.sqrt(native_dim / vectors.shape[-1])
            lo, hi = lo * scale, hi * scale
            levels = np.clip(np.rint((vectors - lo) / (hi - lo) * 255.0), 0, 255)
            return levels.astype(np.uint8) if kind == "uint8" else (levels - 128).astype(np.int8)
    raise RequestError(f"embedding type '{kind}' is not one of: float, int8, uint8, binary, ubinary, base64", param="embedding_types")
