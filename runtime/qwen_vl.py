"""Qwen2-VL's image side without torch: its image processor in numpy + Pillow, the number of image placeholder
tokens a picture takes in the prompt, and the multimodal rotary positions (M-RoPE) of a prompt holding images.

The first pieces of serving Qwen2-VL embedders (GME, DSE) from ONNX (issue #22): the vision graph reads
``pixel_values`` (patches, channels x temporal x patch x patch) with ``image_grid_thw``; the language graph reads
token ids, the image features where the prompt's placeholders are, and these position ids. What transformers'
``Qwen2VLImageProcessorPil`` does, step by step:

1. RGB (transparency composited on white, as every toolkit image path does), EXIF orientation applied;
2. the size: both sides rounded to multiples of ``patch_size * merge_size`` (28), then scaled down or up as
   a whole so that the pixel count stays within [min_pixels, max_pixels], the aspect ratio kept
   (``fit_size``); Pillow's bicubic resize of the uint8 image;
3. ``x / 255`` in float64 then float32, ``(x - mean) / std`` (CLIP's mean and std);
4. patches in the order the vision tower merges them: (h / m, w / m, m, m) blocks of (C, T, p, p) values, the
   single frame repeated ``temporal_patch_size`` times.

Checked against transformers' own processor in ``tests/test_qwen_vl.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import RequestError
from toolkit.runtime.images import _FILTERS, _rgb

__all__ = ["Images", "QwenImages", "QwenVLImageSpec", "fit_size", "mrope_positions", "placeholder_count", "preprocess_qwen_vl", "scaled_size", "vision_positions",
           "position_taps", "window_layout"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200  # Qwen2-VL refuses a more extreme aspect ratio


@dataclass(frozen=True)
class QwenVLImageSpec:
    """The processor's facts (``preprocessor_config.json``): what the manifest will record."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: str = "bicubic"


def fit_size(height: int, width: int, spec: QwenVLImageSpec, index: int = 0) -> tuple[int, int]:
    """(height, width) the processor resizes to: multiples of patch x merge, pixels within [min, max]."""
    factor = spec.patch_size * spec.merge_size
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise RequestError(f"image {index}: {width}x{height} has an aspect ratio past {MAX_ASPECT}:1", param="input")
    return scaled_size(height, width, factor, spec.min_pixels, spec.max_pixels)


def scaled_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, *, frames: int = 1,
                pair: int = 1) -> tuple[int, int]:
    """transformers' ``smart_resize`` core, for an image and for a video's frames: both sides rounded to multiples
    of ``factor``, then scaled as a whole, aspect kept, so that the pixels (of ``frames`` frames, their count
    rounded to multiples of ``pair``) stay within [min_pixels, max_pixels]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / pair) * pair
    if t * h * w > max_pixels:
        shrink = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif t * h * w < min_pixels:
        grow = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def preprocess_qwen_vl(image, spec: QwenVLImageSpec, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A decoded PIL image -> (patches float32 (grid_h * grid_w, 3 * T * p * p), (1, grid_h, grid_w))."""
    image = _rgb(image)
    height, width = fit_size(image.height, image.width, spec, index)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=_FILTERS[spec.resample])
    pixels = (np.asarray(image).astype(np.float64) / 255.0).astype(np.float32)  # (H, W, 3)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    blocks = pixels.transpose(2, 0, 1).reshape(3, grid_h // m, m, p, grid_w // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p)
    frames = np.repeat(blocks[:, :, :, :, :, None], t, axis=5)  # (h/m, w/m, m, m, C, T, p, p)
    return np.ascontiguousarray(frames.reshape(grid_h * grid_w, 3 * t * p * p)), (1, grid_h, grid_w)


def placeholder_count(grid_thw: Sequence[int], merge_size: int) -> int:
    """How many image tokens the prompt holds for an image of this grid (the tower merges m x m patches)."""
    t, h, w = grid_thw
    return t * h * w // merge_size**2


def mrope_positions(is_image: Sequence[bool], grids: Sequence[Sequence[int]], merge_size: int) -> tuple[np.ndarray, int]:
    """M-RoPE position ids (3, seq) of one prompt whose tokens ``is_image`` marks, and the offset (max + 1 - seq)
    that positions after it continue from. Text runs count up on all three axes; an image's tokens take
    (t, row, column) of its merged grid, each offset by the position where the image starts, and the text after
    it resumes at that start plus the grid's larger side."""
    positions = np.zeros((3, len(is_image)), dtype=np.int64)
    images = iter(grids)
    at, current = 0, 0
    flags = list(is_image)
    while at < len(flags):
        end = at
        while end < len(flags) and flags[end] == flags[at]:
            end += 1
        if not flags[at]:
            positions[:, at:end] = np.arange(end - at) + current
            current += end - at
        else:
            t, h, w = next(images)
            gh, gw = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current
            if block.shape[1] != end - at:
                raise RequestError(f"an image of grid {t}x{h}x{w} takes {block.shape[1]} placeholder tokens; the "
                                   f"prompt holds {end - at} there", param="input")
            positions[:, at:end] = block
            current += max(h, w) // merge_size
        at = end
    delta = int(positions.max()) + 1 - len(flags) if len(flags) else 0
    return positions, delta


def vision_positions(grid_thw: Sequence[int], merge_size: int) -> np.ndarray:
    """(patches, 2) int64 (row, column) of each patch in the order ``preprocess_qwen_vl`` lays them out (merge
    blocks first): what the vision graph's 2-D rotary embedding reads, as transformers' get_vision_position_ids."""
    t, h, w = grid_thw
    m = merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = (h // m, m, w // m, m)
    rows = rows.reshape(order).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(order).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)


def window_layout(grid_thw: Sequence[int], spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Qwen2.5-VL's attention windows over one image (transformers' get_vision_window_index): (the merge groups in
    window order, each patch's window id in that order, the order back), int64. Windows are
    ``window_size / merge / patch`` merged groups on a side, laid out row by row, the last ones cut at the edge.
    ``spec``: anything with ``merge_size``, ``patch_size`` and ``window_size`` (the manifest's facts)."""
    t, h, w = grid_thw
    m = spec.merge_size
    gh, gw, side = h // m, w // m, spec.window_size // m // spec.patch_size
    pad_h, pad_w = side - gh % side, side - gw % side
    grid = np.pad(np.arange(t * gh * gw).reshape(t, gh, gw), ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    across, down = (gh + pad_h) // side, (gw + pad_w) // side
    grid = grid.reshape(t, across, side, down, side).transpose(0, 1, 3, 2, 4).reshape(-1)
    windows = np.repeat(np.arange(t * across * down), side * side)
    kept = grid >= 0
    order = grid[kept].astype(np.int64)
    return order, np.repeat(windows[kept], m * m).astype(np.int64), np.argsort(order).astype(np.int64)


def position_taps(grid_thw: Sequence[int], side: int, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned position table (``side`` x ``side``) resampled to one image's patch grid, bilinear with
    aligned corners: (patches, 4) int64 rows of the flattened table and (patches, 4) float32 weights, the patches in
    the order ``preprocess_qwen_vl`` lays them out (merge blocks first), as transformers'
    get_vision_interpolation_indices_and_weights gives them."""
    t, h, w = grid_thw
    m = merge_size
    within = np.arange(h * w)
    col = (within // (m * m)) % (w // m) * m + within % m
    row = within // (m * m * (w // m)) * m + (within // m) % m

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        return taps, np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)

    (rows, row_weights), (cols, col_weights) = axis(row, h), axis(col, w)
    taps = (rows[:, :, None] * side + cols[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return np.tile(taps, (t, 1)), np.tile(weights, (t, 1))


class QwenImages:
    """The Qwen-VL families' part of ``runtime.vision_language.VisionLanguageEncoder``: one image's vision-graph
    feeds (patches, rotary positions, Qwen2.5-VL's windows, Qwen3-VL's position taps) and feature-row count, and a
    prompt's M-RoPE positions. ``spec``: the manifest's vision_language."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.image_spec = QwenVLImageSpec(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                          temporal_patch_size=spec.temporal_patch_size, min_pixels=spec.min_pixels,
                                          max_pixels=spec.max_pixels, mean=tuple(spec.mean), std=tuple(spec.std),
                                          resample=spec.resample)
        self.outputs = ["image_embeds", "deepstack_embeds"] if spec.deepstack else ["image_embeds"]

    def prepare(self, image, index: int) -> tuple[dict[str, np.ndarray], int, tuple]:
        pixels, grid = preprocess_qwen_vl(image, self.image_spec, index)
        return self.feeds(pixels, grid), placeholder_count(grid, self.spec.merge_size), grid

    def feeds(self, pixels: np.ndarray, grid: tuple) -> dict[str, np.ndarray]:
        """The vision graph's feeds for one grid of patches (an image, or a video's pair of frames)."""
        spec = self.spec
        feeds = {"pixel_values": pixels, "positions": vision_positions(grid, spec.merge_size)}
        if spec.window_size:  # Qwen2.5-VL: attention within windows in most blocks
            feeds["window_order"], feeds["window_ids"], feeds["restore"] = window_layout(grid, spec)
        if spec.position_grid:  # Qwen3-VL: the learned position table resampled to this grid
            feeds["position_taps"], feeds["position_weights"] = position_taps(grid, spec.position_grid, spec.merge_size)
        return feeds

    def positions(self, is_image: Sequence[bool], grids: Sequence) -> np.ndarray:
        return mrope_positions(is_image, grids, self.spec.merge_size)[0]


Images = QwenImages  # the family's runtime half (``toolkit.vision_families``): what the encoder builds from the spec
