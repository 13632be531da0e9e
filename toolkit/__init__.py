"""onnx-embed-toolkit: export embedding models to one verified ONNX artifact and serve them.

Public API, imported lazily so ``import toolkit`` stays light:
``Embedder``, ``AsyncEmbedder`` (runtime, no torch) and ``export_model`` (needs torch).
"""

from __future__ import annotations

__all__ = ["AsyncEmbedder", "Embedder", "__version__", "export_model"]
__version__ = "0.1.0"

_LAZY = {
    "Embedder": "toolkit.runtime.embedder",
    "AsyncEmbedder": "toolkit.runtime.async_embedder",
    "export_model": "toolkit.export.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
