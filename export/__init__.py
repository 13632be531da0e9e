"""Export: a Hugging Face embedding model to one verified ONNX artifact (needs torch)."""

from toolkit.export.pipeline import ExportResult, export_model

__all__ = ["ExportResult", "export_model"]
