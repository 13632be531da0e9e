"""Qwen2-VL's image side without torch (``toolkit.runtime.qwen_vl``), against transformers' own pieces: the image
processor (``Qwen2VLImageProcessorPil``) on awkward images, the placeholder count, and ``get_rope_index``'s
multimodal rotary positions."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.runtime.qwen_vl import (
    QwenVLImageSpec,
    fit_size,
    mrope_positions,
    placeholder_count,
    preprocess_qwen_vl,
)

SPEC = QwenVLImageSpec(min_pixels=56 * 56, max_pixels=28 * 28 * 64)  # small images keep the test fast


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(w, h, mode="RGB"):
        bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        return Image.fromarray(data[:, :, 0] if bands == 1 else data, mode)

    palette = noise(90, 70).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return {"tiny": noise(9, 13), "huge": noise(1400, 1000), "wide": noise(900, 30), "tall": noise(25, 700),
            "rgba": noise(120, 80, "RGBA"), "gray": noise(64, 100, "L"), "palette": palette,
            "exact": noise(56, 84)}


@pytest.mark.parametrize("name", list(_images()))
def test_the_image_processor_matches_transformers(name):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _images()[name]
    reference = Qwen2VLImageProcessorPil(min_pixels=SPEC.min_pixels, max_pixels=SPEC.max_pixels)(
        images=[image], return_tensors="np")
    patches, grid = preprocess_qwen_vl(image, SPEC)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert patches.shape == reference["pixel_values"].shape and patches.dtype == np.float32
    assert np.abs(patches - reference["pixel_values"]).max() <= 1e-4
    assert placeholder_count(grid, SPEC.merge_size) == reference["pixel_values"].shape[0] // SPEC.merge_size**2


def test_sizes_follow_the_processors_rule():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(1, 1), (27, 29), (28, 28), (600, 3), (3, 599), (4000, 3000), (56, 56 * 199), (777, 555)]:
        assert fit_size(h, w, SPEC) == smart_resize(h, w, factor=28, min_pixels=SPEC.min_pixels,
                                                    max_pixels=SPEC.max_pixels), (h, w)
    with pytest.raises(Exception, match="aspect ratio"):
        fit_size(10, 2100, SPEC)


def test_rotary_positions_match_get_rope_index():
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig(
        text_config={"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 64,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=299, vision_start_token_id=297, vision_end_token_id=298)
    model = Qwen2VLModel(config).eval()
    grids = [(1, 4, 6), (1, 2, 2)]
    prompt = ([5, 6, 7, 297] + [299] * placeholder_count(grids[0], 2) + [298, 8, 9, 297]
              + [299] * placeholder_count(grids[1], 2) + [298, 10])
    is_image = [t == 299 for t in prompt]
    ids = torch.tensor([prompt])
    expected, delta = model.get_rope_index(ids, torch.tensor([is_image], dtype=torch.int32),
                                           image_grid_thw=torch.tensor(grids))
    got, got_delta = mrope_positions(is_image, grids, 2)
    np.testing.assert_array_equal(got, expected[:, 0].numpy())
    assert got_delta == int(delta[0, 0])
    text_only, zero = mrope_positions([False] * 5, [], 2)
    np.testing.assert_array_equal(text_only, np.tile(np.arange(5), (3, 1)))
    assert zero == 0
    with pytest.raises(Exception, match="placeholder tokens"):
        mrope_positions([False, True, True, False], [(1, 4, 6)], 2)


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 8, 12), (1, 6, 36), (1, 12, 18), (2, 8, 8)])
def test_windows_match_transformers(grid):
    """Qwen2.5-VL's attention windows: the group order, each patch's window and the order back, as
    transformers' get_vision_window_index lays them out (cu_window_seqlens marks where each window ends)."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    from toolkit.runtime.qwen_vl import window_layout

    class Spec:
        merge_size, patch_size, window_size = 2, 14, 56

    order, windows, restore = window_layout(grid, Spec)
    index, bounds = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=56, patch_size=14)
    assert order.tolist() == index.tolist()
    ends = np.flatnonzero(np.diff(windows)) + 1  # where a new window starts, in patches
    assert [0, *ends.tolist(), len(windows)] == bounds.tolist()
    assert (order[restore] == np.arange(len(order))).all()


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 8, 12), (1, 6, 36), (2, 10, 4)])
def test_position_taps_match_transformers(grid):
    """Qwen3-VL's learned position table resampled to a grid (bilinear, aligned corners), patches in merge order."""
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from toolkit.runtime.qwen_vl import position_taps

    taps, weights = position_taps(grid, 48, 2)
    index, reference = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), num_grid_per_side=48, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert taps.tolist() == index.tolist()
    np.testing.assert_allclose(weights, reference.numpy(), atol=1e-6)


def test_an_exif_rotated_photo_is_read_upright_as_transformers_loads_it(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6: the runtime's decode (bytes -> upright image) and
    preprocessing against transformers' load_image (which applies the orientation) and its image processor."""
    from PIL import Image
    from transformers.image_utils import load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.runtime.images import decode_image

    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8))  # 160 wide as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: upright it is 90 wide, 160 tall
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    ours, grid = preprocess_qwen_vl(decode_image(path.read_bytes()), SPEC)
    upright = load_image(str(path))
    assert upright.size == (90, 160)
    reference = Qwen2VLImageProcessorPil(min_pixels=SPEC.min_pixels, max_pixels=SPEC.max_pixels)(
        images=[upright], return_tensors="np")
    assert list(grid) == reference["image_grid_thw"][0].tolist() and grid[1] > grid[2]  # taller than wide
    assert np.abs(ours - reference["pixel_values"]).max() <= 1e-4
