"""Export: a Hugging Face embedding model to one verified ONNX artifact (needs torch: the [export] extra).

Imported lazily, so ``import toolkit.export.<module>`` names what it needs and ``toolkit cards`` or a
serving install never pulls torch in through this package.
"""

from toolkit.lazy import lazy_exports

__all__ = ["CachedArtifact", "ExportResult", "ensure_artifact", "export_model"]

_LAZY = {
    "ExportResult": "toolkit.export.pipeline",
    "export_model": "toolkit.export.pipeline",
    "CachedArtifact": "toolkit.export.cache",
    "ensure_artifact": "toolkit.export.cache",
}

__getattr__ = lazy_exports(__name__, _LAZY)
