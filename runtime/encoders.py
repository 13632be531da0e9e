"""Input encoders, one per modality: how a modality's inputs become model inputs, and the graph that runs them.

The manifest declares the encoder of each modality (``Manifest.encoders``); opening an artifact opens
``ENCODERS[name]`` for each name it declares, and every ``Run`` of the task table names the modality its items belong to.
A new modality is a new encoder here (plus its preprocessing module, as ``runtime/images.py``, and its export
tower): the engines, the batcher and the task table do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from toolkit.errors import ConfigError
from toolkit.manifest import MANIFEST_KEY, decode_manifest
from toolkit.runtime.artifact import image_tower_path
from toolkit.runtime.context import Encoder, ModelContext
from toolkit.runtime.images import (
    Pixels,
    as_image_list,
    is_image_input,
    load_pixels,
    require_pillow,
)
from toolkit.runtime.session import LoadedAdapter, OrtSession, refuse_adapter
from toolkit.runtime.tokenization import pad_batch
from toolkit.runtime.vision_language import VisionLanguageEncoder

__all__ = ["ENCODERS", "Encoder", "ImageEncoder", "TextEncoder", "by_modality", "declared_modality", "modality_of",
           "open_encoders"]

_DECODE_THREADS = 4  # images decoded at once per Embedder (Pillow releases the GIL while decoding and resizing)


class TextEncoder:
    """Texts and token ids: tokenized by the artifact's tokenizer (``ModelContext.tokenize_inputs``), padded per batch
    on the card's side, through the text graph."""

    modality = "text"
    builds_inputs = False  # the task table tokenizes (``ModelContext.tokenize_inputs``)

    @staticmethod
    def accepts(item) -> bool:
        return modality_of(item) == "text"

    def __init__(self, ctx: ModelContext, path: Path) -> None:
        self.session = ctx.session
        self._feeds = {"pad_id": ctx.manifest.pad_token_id, "side": ctx.padding,
                       "type_ids": "token_type_ids" in ctx.session.input_names,
                       "length": ctx.manifest.max_seq_len if ctx.card.pad_to_max_length else None}

    def run(self, items: Sequence, outputs: Sequence[str], adapter: LoadedAdapter | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, pad_batch(items, **self._feeds), adapter)


class ImageEncoder:
    """Images (PIL, bytes, paths, data URIs): decoded and preprocessed as the manifest's ``image.preprocess`` says
    (Pillow + numpy), on a bounded pool of threads, through the image tower beside the artifact."""

    modality = "image"
    builds_inputs = False  # the task table decodes (``load``)
    accepts = staticmethod(is_image_input)  # PIL images, bytes, paths, data:image URIs, ImageRef

    def __init__(self, ctx: ModelContext, path: Path) -> None:
        require_pillow()
        tower = ctx.manifest.image
        if tower is None:
            raise ConfigError(f"{path}: its manifest lists an image modality but no image tower")
        image_path = image_tower_path(path)
        if not image_path.is_file():
            raise ConfigError(f"{path}: its image tower {image_path.name} is not beside it (an export writes both "
                              "files; keep them together)")
        self.session = OrtSession(image_path, ctx.options)
        own = decode_manifest(self.session.metadata.get(MANIFEST_KEY, "{}"), source=str(image_path))
        if own.tower != "image" or own.card != ctx.manifest.card:
            raise ConfigError(f"{image_path}: not the image tower of {path.name} (its manifest differs)")
        self.tower, self.spec = tower, tower.preprocess
        self.outputs = tower.outputs  # (final, raw): normalized as the card says, and the projection only
        self._pool: ThreadPoolExecutor | None = None

    def decode(self, sources: list, offset: int) -> list[Future]:
        """Start decoding + preprocessing ``sources`` (input indices from ``offset``) on the bounded pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="toolkit-decode")
        return [self._pool.submit(load_pixels, image, offset + i, self.spec, self.tower.tokens)
                for i, image in enumerate(sources)]

    @staticmethod
    def collect(futures: list[Future]) -> list[Pixels]:
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def load(self, images) -> list[Pixels]:
        """Preprocessed pixels of ``images``; RequestError names the first input that fails."""
        return self.collect(self.decode(as_image_list(images), 0))

    def run(self, items: Sequence, outputs: Sequence[str], adapter: LoadedAdapter | None = None) -> list[np.ndarray]:
        refuse_adapter(adapter, "image tower")
        pixels = np.stack([item.pixels for item in items])  # (batch, 3, height, width)
        return self.session.run(outputs, {self.tower.input: pixels})


# encoder name (the manifest's ``encoders`` values) -> class; a single-modality encoder is named after its modality
ENCODERS: dict[str, type] = {"text": TextEncoder, "image": ImageEncoder, "vision_language": VisionLanguageEncoder}


def modality_of(item) -> str:
    """The modality of ``item``: that of the first non-text encoder that accepts it (an image, a ``Multimodal``
    item), else text."""
    return next((enc.modality for name, enc in ENCODERS.items() if name != "text" and enc.accepts(item)), "text")


def declared_modality(item) -> str:
    """The modality an input declares (its type's ``modality``: an ``ImageRef`` says "image"); anything else is
    text, whatever it says (a server's text that looks like a data URI stays text)."""
    return getattr(type(item), "modality", "text")


def by_modality(items: Sequence, modality=modality_of) -> dict[str, list[int]]:
    """Positions of ``items`` per modality (``modality`` tells them apart), in the order they first appear."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(modality(item), []).append(i)
    return groups


def open_encoders(ctx: ModelContext, path: Path) -> dict[str, Encoder]:
    """The artifact's encoders, one per modality its manifest lists, as its manifest declares them (one encoder
    object for the modalities that share one: a vision-language artifact's texts, images, items with both and
    videos go through the same two graphs); ConfigError for one this toolkit lacks."""
    declared = ctx.manifest.encoders
    unknown = sorted({name for name in declared.values() if name not in ENCODERS})
    if unknown:
        raise ConfigError(f"{path}: encoder {', '.join(unknown)} is not one this toolkit has "
                          f"({', '.join(ENCODERS)}); upgrade onnx-embed-toolkit")
    opened: dict[str, Encoder] = {}
    for name in dict.fromkeys(declared.values()):
        opened[name] = ENCODERS[name](ctx, path)
    return {modality: opened[name] for modality, name in declared.items()}
