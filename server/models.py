"""The served models, looked up by a request's ``model``."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ModelNotFoundError
from toolkit.runtime.async_embedder import AsyncEmbedder

__all__ = ["ModelRegistry", "ServedModel"]


@dataclass
class ServedModel:
    name: str
    engine: AsyncEmbedder

    @property
    def embedder(self):
        return self.engine.embedder


class ModelRegistry:
    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}

    def get(self, name: str | None) -> ServedModel:
        """``name`` may be omitted only when one model is served."""
        if name is None or name == "":
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ModelNotFoundError(f"several models are served; name one of: {', '.join(self.models)}")
        if name not in self.models:
            raise ModelNotFoundError(f"model '{name}' is not served here; served: {', '.join(self.models)}")
        return self.models[name]
