"""Input encoders, one per modality: how a modality's inputs become model inputs, and the graph that runs them.

The manifest's head lists the artifact's modalities (``HeadSpec.modalities``); ``Embedder`` opens
``ENCODERS[modality]`` for each, and every ``Run`` of the task table names the modality its items belong to.
A new modality is a new encoder here (plus its preprocessing module, as ``runtime/images.py``, and its export
tower): the engines, the batcher and the task table do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from toolkit.errors import ConfigError
from toolkit.manifest import MANIFEST_KEY, decode_manifest
from toolkit.runtime.artifact import image_tower_path
from toolkit.runtime.images import (
    Pixels,
    as_image_list,
    is_image_input,
    load_pixels,
    require_pillow,
)
from toolkit.runtime.session import OrtSession
from toolkit.runtime.tokenization import pad_batch

if TYPE_CHECKING:
    from toolkit.runtime.embedder import Embedder

__all__ = ["ENCODERS", "Encoder", "ImageEncoder", "TextEncoder", "by_modality", "declared_modality", "modality_of", "open_encoders"]

_DECODE_THREADS = 4  # images decoded at once per Embedder (Pillow releases the GIL while decoding and resizing)


class Encoder(Protocol):
    """What the engines ask of a modality: run a batch of its model inputs through its graph."""

    modality: str

    @staticmethod
    def accepts(item) -> bool:
        """Whether ``item`` is an input of this modality (text, the fallback, takes whatever no other claims)."""

    def run(self, items: Sequence, outputs: Sequence[str]) -> list[np.ndarray]:
        """(batch, ...) arrays in ``outputs`` order for one batch of this modality's model inputs."""


class TextEncoder:
    """Texts and token ids: tokenized by the artifact's tokenizer (``Embedder.tokenize_inputs``), padded per batch
    on the card's side, through the text graph."""

    modality = "text"

    @staticmethod
    def accepts(item) -> bool:
        return modality_of(item) == "text"

    def __init__(self, emb: Embedder, path: Path) -> None:
        self.emb = emb
        self._type_ids = "token_type_ids" in emb.session.input_names

    def run(self, items: Sequence, outputs: Sequence[str]) -> list[np.ndarray]:
        emb = self.emb
        feeds = pad_batch(items, pad_id=emb.manifest.pad_token_id, side=emb.padding, type_ids=self._type_ids,
                          length=emb.manifest.max_seq_len if emb.card.pad_to_max_length else None)
        return emb.session.run(outputs, feeds)


class ImageEncoder:
    """Images (PIL, bytes, paths, data URIs): decoded and preprocessed as the manifest's ``image.preprocess`` says
    (Pillow + numpy), on a bounded pool of threads, through the image tower beside the artifact."""

    modality = "image"
    accepts = staticmethod(is_image_input)  # PIL images, bytes, paths, data:image URIs, ImageRef

    def __init__(self, emb: Embedder, path: Path) -> None:
        require_pillow()
        tower = emb.manifest.image
        if tower is None:
            raise ConfigError(f"{path}: its manifest lists an image modality but no image tower")
        image_path = image_tower_path(path)
        if not image_path.is_file():
            raise ConfigError(f"{path}: its image tower {image_path.name} is not beside it (an export writes both "
                              "files; keep them together)")
        self.session = OrtSession(image_path, emb.options)
        own = decode_manifest(self.session.metadata.get(MANIFEST_KEY, "{}"), source=str(image_path))
        if own.tower != "image" or own.card != emb.card:
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

    def run(self, items: Sequence, outputs: Sequence[str]) -> list[np.ndarray]:
        pixels = np.stack([item.pixels for item in items])  # (batch, 3, height, width)
        return self.session.run(outputs, {self.tower.input: pixels})


ENCODERS: dict[str, type] = {"text": TextEncoder, "image": ImageEncoder}


def modality_of(item) -> str:
    """The modality whose encoder reads ``item``: the first non-text encoder that accepts it, else text."""
    return next((name for name, enc in ENCODERS.items() if name != "text" and enc.accepts(item)), "text")


def declared_modality(item) -> str:
    """The modality an input declares (an ``ImageRef`` says "image"); anything else is text, whatever it says
    (a server's text that looks like a data URI stays text)."""
    return getattr(type(item), "modality", "text")


def by_modality(items: Sequence, modality=modality_of) -> dict[str, list[int]]:
    """Positions of ``items`` per modality (``modality`` tells them apart), in the order they first appear."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(modality(item), []).append(i)
    return groups


def open_encoders(emb: Embedder, path: Path) -> dict[str, Encoder]:
    """The artifact's encoders, one per modality its manifest lists; ConfigError for one this toolkit lacks. A
    vision-language artifact has one encoder for all its modalities (texts, images and items with both go
    through the same two graphs)."""
    if emb.manifest.vision_language is not None:
        from toolkit.runtime.vision_language import VisionLanguageEncoder

        shared = VisionLanguageEncoder(emb, path)
        video = ("video",) if emb.manifest.vision_language.video is not None else ()  # Qwen3-VL
        return {modality: shared for modality in (*emb.head.modalities, *video)}
    unknown = [m for m in emb.head.modalities if m not in ENCODERS]
    if unknown:
        raise ConfigError(f"{path}: modality {', '.join(unknown)} is not one this toolkit reads "
                          f"({', '.join(ENCODERS)}); upgrade onnx-embed-toolkit")
    return {modality: ENCODERS[modality](emb, path) for modality in emb.head.modalities}
