"""The served models, looked up by a request's ``model``."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ModelNotFoundError, NotReadyError, RequestError
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

    def base(self, name: str | None) -> ServedModel:
        """The served base model ``name`` (None: the only one); ModelNotFoundError / RequestError naming them."""
        bases = [m for m in self.models.values() if m.parent is None]
        if name is None:
            if len(bases) != 1:
                raise RequestError(f"several base models are served; name one in base_model_name: "
                                   f"{', '.join(m.name for m in bases)}", param="base_model_name")
            return bases[0]
        found = self.models.get(name)
        if found is None or found.parent is not None:
            raise ModelNotFoundError(f"base model '{name}' is not served here; served: "
                                     f"{', '.join(m.name for m in bases)}", param="base_model_name")
        return found

    def add_adapter(self, base: ServedModel, adapter) -> ServedModel:
        """Serve ``adapter`` (a ``LoadedAdapter`` of ``base``'s session) under its name, on ``base``'s batcher,
        replacing one of the same name."""
        base.embedder.context.adapters[adapter.name] = adapter
        served = ServedModel(adapter.name, base.engine.for_adapter(adapter.name), parent=base.name)
        self.models[adapter.name] = served
        if adapter.name not in self.names:
            self.names.append(adapter.name)
        return served

    def remove_adapter(self, name: str) -> None:
        """Stop serving the adapter ``name``: new requests naming it get the usual 404; queued ones fail with a
        400 naming the adapters left."""
        served = self.models.pop(name)
        self.names.remove(name)
        served.embedder.context.adapters.pop(name, None)

    def queue_depth(self) -> int:
        """Inputs waiting in the open models' batchers (the ``toolkit_queue_depth`` gauge)."""
        return sum(s.engine.queue_depth for s in self.models.values())
