"""LLaVA-NeXT's image side without torch (e5-v): its any-resolution image processor in numpy + Pillow, and the
layout of an image's feature rows in the prompt.

What transformers' ``LlavaNextImageProcessorPil`` does, step by step:

1. RGB (transparency composited on white), as every toolkit image path does;
2. the best grid resolution among the config's ``image_grid_pinpoints`` (``best_resolution``: the one that keeps
   the most of the image's pixels, then wastes the fewest); the image resized into it keeping its aspect ratio
   (Pillow, bicubic, on the uint8 image), centred on a black canvas of that resolution, cut into crop x crop tiles
   row by row;
3. before the tiles, the whole image squashed to crop x crop (the "base" view);
4. each view ``x / 255`` then ``(x - mean) / std`` (CLIP's), channels first.

The model then runs the vision tower over every view, keeps one row per patch (the class token dropped), projects
them, and lays the tiles' rows out as one map of the padded canvas, cut back to the image's own aspect ratio
(``unpad_image``), a learned "newline" row after every row of the map, all after the base view's rows
(``feature_layout`` gives that order as indices, so the vision graph is a plain gather). Checked against
transformers' own processor and model in ``tests/test_llava_next.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.runtime.images import _FILTERS, _rgb

__all__ = ["Images", "LlavaNextImageSpec", "LlavaNextImages", "best_resolution", "feature_layout", "preprocess_llava_next"]


@dataclass(frozen=True)
class LlavaNextImageSpec:
    """The processor's and tower's facts (the manifest's ``vision_language``)."""

    crop_size: int  # the tower's input side (336 for e5-v's CLIP ViT-L/14-336)
    patch_size: int  # the tower's patch side (14)
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions the image may be tiled at
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = "bicubic"


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) among ``pinpoints`` that keeps the most of the image's pixels once it is scaled to fit, and
    of those wastes the fewest (transformers' select_best_resolution)."""
    best, most, waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > most or (kept == most and wasted < waste):
            best, most, waste = (int(h), int(w)), kept, wasted
    return best


def _fit(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size the image takes inside ``target`` keeping its aspect ratio (get_patch_output_size)."""
    th, tw = target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def preprocess_llava_next(image, spec: LlavaNextImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """A decoded PIL image -> (views float32 (1 + tiles, 3, crop, crop), its feature layout (``feature_layout``))."""
    from PIL import Image

    image = _rgb(image)
    width, height = image.size
    target = best_resolution(height, width, spec.grid_pinpoints)
    new_h, new_w = _fit(height, width, target)
    filt, crop = _FILTERS[spec.resample], spec.crop_size
    canvas = Image.new("RGB", (target[1], target[0]))  # black: the processor pads with zeros before rescaling
    canvas.paste(image.resize((new_w, new_h), resample=filt), ((target[1] - new_w) // 2, (target[0] - new_h) // 2))
    views = [np.asarray(image.resize((crop, crop), resample=filt))]
    tiles = np.asarray(canvas)
    views += [tiles[y:y + crop, x:x + crop] for y in range(0, target[0], crop) for x in range(0, target[1], crop)]
    pixels = (np.stack(views).astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), feature_layout(height, width, spec)


def feature_layout(height: int, width: int, spec: LlavaNextImageSpec) -> np.ndarray:
    """int64 indices, in prompt order, into the vision graph's rows (every view's patch rows, view by view, then one
    newline row at the end): the base view's rows, then the tiles' map row by row, cut to the image's aspect ratio
    as transformers' unpad_image cuts it, each map row followed by the newline. Its length is the number of image
    tokens the prompt holds for this image."""
    side = spec.crop_size // spec.patch_size  # patch rows per view side
    per_view = side * side
    th, tw = best_resolution(height, width, spec.grid_pinpoints)
    tiles_h, tiles_w = th // spec.crop_size, tw // spec.crop_size
    map_h, map_w = tiles_h * side, tiles_w * side
    rows, cols = np.arange(map_h), np.arange(map_w)
    if width / height > map_w / map_h:  # wider than the map: rows of padding above and below are cut
        pad = (map_h - int(round(height * (map_w / width), 7))) // 2
        rows = rows[pad:map_h - pad]
    else:
        pad = (map_w - int(round(width * (map_h / height), 7))) // 2
        cols = cols[pad:map_w - pad]
    tile = 1 + (rows[:, None] // side) * tiles_w + cols[None, :] // side  # view index (the base view is 0)
    index = tile * per_view + (rows[:, None] % side) * side + cols[None, :] % side
    newline = (1 + tiles_h * tiles_w) * per_view
    grid = np.concatenate([index, np.full((len(rows), 1), newline)], axis=1)
    return np.concatenate([np.arange(per_view), grid.reshape(-1)]).astype(np.int64)


class LlavaNextImages:
    """LLaVA-NeXT's part of ``runtime.vision_language.VisionLanguageEncoder``: one image's views and feature layout
    (the vision graph's feeds) and its feature-row count; a prompt's positions count up (the language model is a
    plain decoder). ``spec``: the manifest's vision_language."""

    outputs = ("image_embeds",)

    def __init__(self, spec) -> None:
        self.image_spec = LlavaNextImageSpec(
            crop_size=spec.crop_size, patch_size=spec.patch_size,
            grid_pinpoints=tuple((int(h), int(w)) for h, w in spec.grid_pinpoints),
            mean=tuple(spec.mean), std=tuple(spec.std), resample=spec.resample)

    def prepare(self, image, index: int) -> tuple[dict[str, np.ndarray], int, None]:
        views, layout = preprocess_llava_next(image, self.image_spec)
        return {"pixel_values": views, "layout": layout}, len(layout), None

    @staticmethod
    def positions(is_image: Sequence[bool], grids: Sequence) -> np.ndarray:
        return np.arange(len(is_image), dtype=np.int64)[None]


Images = LlavaNextImages  # the family's runtime half (``toolkit.vision_families``): what the encoder builds from the spec
