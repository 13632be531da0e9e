"""The serving runtime: onnxruntime + tokenizers + numpy, never torch."""

from toolkit.runtime.embedder import Embedder

__all__ = ["AsyncEmbedder", "Embedder"]


def __getattr__(name: str):
    if name == "AsyncEmbedder":
        from toolkit.runtime.async_embedder import AsyncEmbedder

        return AsyncEmbedder
    raise AttributeError(name)
