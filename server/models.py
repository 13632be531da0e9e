"""The served models, looked up by a request's ``model``."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ModelNotFoundError, NotReadyError
from toolkit.runtime.async_embedder import AsyncEmbedder

__all__ = ["ModelRegistry", "ServedModel"]


@dataclass
class ServedModel:
    name: str
    engine: AsyncEmbedder
    parent: str | None = None  # a LoRA adapter's base model (its served name); None: a base model

    @property
    def embedder(self):
        return self.engine.embedder


class ModelRegistry:
    """The served models by name. ``names``: every name served, where only some are open at a time (Ray Serve's
    multiplexing opens a replica's models on demand); by default the open ones."""

    def __init__(self, models: list[ServedModel], names: list[str] | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.names = list(self.models) if names is None else list(names)

    def get(self, name: str | None) -> ServedModel:
        """``name`` may be omitted only when one model is served."""
        if name is None or name == "":
            if len(self.names) != 1:
                raise ModelNotFoundError(f"several models are served; name one of: {', '.join(self.names)}")
            name = self.names[0]
        if name not in self.names:
            raise ModelNotFoundError(f"model '{name}' is not served here; served: {', '.join(self.names)}")
        if name not in self.models:
            raise NotReadyError(f"model '{name}' is not open on this replica (it was closed for another): retry")
        return self.models[name]

    def queue_depth(self) -> int:
        """Inputs waiting in the open models' batchers (the ``toolkit_queue_depth`` gauge)."""
        return sum(s.engine.queue_depth for s in self.models.values())
