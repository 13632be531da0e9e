"""onnx-embed-toolkit: export embedding models to one verified ONNX artifact and serve them.

Public API, imported lazily so ``import toolkit`` stays light:
``Embedder``, ``AsyncEmbedder`` (runtime, no torch) and ``export_model`` (needs torch).
"""

from __future__ import annotations

from toolkit.lazy import lazy_exports

__all__ = ["AsyncEmbedder", "Embedder", "__version__", "export_model"]
__version__ = "0.1.0"

_LAZY = {
    "Embedder": "toolkit.runtime.embedder",
    "AsyncEmbedder": "toolkit.runtime.async_embedder",
    "export_model": "toolkit.export.pipeline",
}

__getattr__ = lazy_exports(__name__, _LAZY)
