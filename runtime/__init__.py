"""The serving runtime: onnxruntime + tokenizers + numpy, never torch."""

from toolkit.lazy import lazy_exports
from toolkit.runtime.embedder import Embedder

__all__ = ["AsyncEmbedder", "Embedder"]

__getattr__ = lazy_exports(__name__, {"AsyncEmbedder": "toolkit.runtime.async_embedder"})
