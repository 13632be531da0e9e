"""PaliGemma's image side without torch (ColPali): SigLIP's image processor (RGB, the image squashed to the tower's
side, ``x / 255``, ``(x - mean) / std``, channels first; ``runtime.images.preprocess``) and a prompt's positions
(one axis, counting from 1 as PaliGemma counts). Each image is ``(side / patch)**2`` rows of the vision graph."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toolkit.manifest import ImagePreprocess
from toolkit.runtime.images import preprocess

__all__ = ["Images", "PaliGemmaImages"]


class PaliGemmaImages:
    """PaliGemma's part of ``runtime.vision_language.VisionLanguageEncoder`` (``spec``: the manifest's
    vision_language)."""

    outputs = ("image_embeds",)

    def __init__(self, spec) -> None:
        side = spec.crop_size
        self.rows = (side // spec.patch_size) ** 2
        self.preprocess = ImagePreprocess(resize="fixed", size=[side, side], resample=spec.resample,
                                          mean=list(spec.mean), std=list(spec.std), height=side, width=side)

    def prepare(self, image, index: int) -> tuple[dict[str, np.ndarray], int, None]:
        return {"pixel_values": preprocess(image, self.preprocess, index)[None]}, self.rows, None

    @staticmethod
    def positions(is_image: Sequence[bool], grids: Sequence) -> np.ndarray:
        return np.arange(1, len(is_image) + 1, dtype=np.int64)[None]


Images = PaliGemmaImages  # the family's runtime half (``toolkit.vision_families``)
