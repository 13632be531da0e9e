"""Qwen-VL embedders (GME, DSE: Qwen2-VL; jina-v4's base: Qwen2.5-VL; Qwen3-VL-Embedding): the family's export
half (``toolkit.vision_families``): its vision graph, its manifest facts and the transformers reference.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share this module and differ by facts that ``build_spec`` decides once from the
config: Qwen2.5-VL's attention windows (``window_size``), Qwen3-VL's learned position table (``position_grid``),
its DeepStack layers (``deepstack``) and its videos (``video``). The language graph is
``export.vision_language.LanguageGraph`` with M-RoPE's three position axes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.errors import ConfigError
from toolkit.export.heads import language_width
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ParityReport, VideoFacts, VisionLanguage

__all__ = ["POSITION_AXES", "VisionGraph", "build_spec", "export_vision", "load_processor", "run_reference"]

POSITION_AXES = 3  # M-RoPE: (temporal, height, width) positions for every token


class VisionGraph(nn.Module):
    """One image: patches (n, 3 * T * p * p), positions (n, 2) -> feature rows (n / merge**2, hidden).

    Qwen2.5-VL's tower attends within windows in most blocks (all but ``fullatt_block_indexes``): its graph also
    takes the window layout of the image (``runtime.qwen_vl.window_layout``): the order of the merge groups by
    window, each patch's window in that order, and the order back; a windowed block masks attention across
    windows, as transformers' per-window loop over ``cu_window_seqlens`` does.

    Qwen3-VL's tower adds its learned position table, resampled to the image's grid (``position_taps``: four
    table rows and their bilinear weights per patch), and also returns DeepStack's rows: those of some middle
    layers through their own mergers, (layers, rows, hidden)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.full = set(getattr(visual, "fullatt_block_indexes", None) or ())
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.group = visual.spatial_merge_size ** 2
        self.deepstack = list(getattr(visual, "deepstack_visual_indexes", None) or ())

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, *layout: torch.Tensor):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        n = hidden.shape[0]
        window_order, window_ids, restore = layout if self.windowed else (None, None, None)
        if hasattr(visual, "pos_embed"):  # Qwen3-VL: taps, weights
            taps, weights = layout
            hidden = hidden + (visual.pos_embed(taps) * weights.unsqueeze(-1)).sum(1)

        def by_window(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n // self.group, self.group, -1)[window_order].reshape(n, -1) if self.windowed else x

        hidden = by_window(hidden)
        cos, sin = (by_window(t) for t in visual.rotary_pos_emb(hidden, positions))
        bias = None
        if self.windowed:
            apart = window_ids.unsqueeze(0) != window_ids.unsqueeze(1)
            bias = torch.zeros(apart.shape, dtype=hidden.dtype).masked_fill(apart, torch.finfo(hidden.dtype).min)
        deep = []
        for i, block in enumerate(visual.blocks):
            attn, states = block.attn, block.norm1(hidden)
            q, k, v = attn.qkv(states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, n, head_dim)
            mask = None if (i in self.full or not self.windowed) else bias
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
            if i in self.deepstack:
                deep.append(visual.deepstack_merger_list[self.deepstack.index(i)](hidden))
        rows = visual.merger(hidden)
        if self.deepstack:
            return rows, torch.stack(deep)
        return rows[restore] if self.windowed else rows


def build_spec(resolved: ResolvedModel, cfg: dict, tokenizer, token: str, token_id: int,
               resample: str) -> VisionLanguage:
    """The manifest's facts for a Qwen-VL checkpoint (``cfg``: its preprocessor_config.json; ``tokenizer``: the
    artifact's ``runtime.tokenization.Tokenizer``); the family's own facts decided here, from config.json."""
    vision = resolved.config.get("vision_config") or {}
    size = cfg.get("size") or {}
    card = resolved.card
    min_pixels = int(card.image_min_pixels or cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    max_pixels = int(card.image_max_pixels or cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    if min_pixels > max_pixels:
        raise ConfigError(f"image pixel bounds {min_pixels}..{max_pixels}: the minimum is above the maximum")
    suffix = card.prompt_suffix
    if suffix is None:
        suffix = "<|endoftext|>" if tokenizer.token_id("<|endoftext|>") is not None else ""
    family = resolved.arch.model_type
    window = int(vision.get("window_size") or 0) if family == "qwen2_5_vl" else 0
    grid = int(int(vision.get("num_position_embeddings") or 0) ** 0.5) if family == "qwen3_vl" else 0
    deepstack = len(vision.get("deepstack_visual_indexes") or ()) if family == "qwen3_vl" else 0
    return VisionLanguage(
        family=family, window_size=window, position_grid=grid, deepstack=deepstack, image_token=token,
        image_token_id=token_id, prompt_suffix=suffix, instruction_at=card.instruction_at,
        image_only_text=card.image_only_text, placeholder_image=card.placeholder_image,
        patch_size=int(cfg.get("patch_size") or vision.get("patch_size") or 14),
        merge_size=int(cfg.get("merge_size") or vision.get("spatial_merge_size") or 2),
        temporal_patch_size=int(cfg.get("temporal_patch_size") or vision.get("temporal_patch_size") or 2),
        min_pixels=min_pixels, max_pixels=max_pixels,
        mean=[float(v) for v in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))],
        std=[float(v) for v in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))],
        resample=resample, hidden_size=language_width(resolved.config),
        video=_video_facts(resolved, tokenizer, cfg) if family == "qwen3_vl" else None,
        parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False))


def _video_facts(resolved: ResolvedModel, tokenizer, image_cfg: dict) -> VideoFacts:
    """Qwen3-VL's video facts: video_preprocessor_config.json (transformers' Qwen3VLVideoProcessor defaults where
    absent), the card's sampling where its authors set their own, the prompt's token strings from config.json."""
    path = resolved.model_dir / "video_preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    size, card = cfg.get("size") or {}, resolved.card

    def token(key: str, default: str) -> str:
        found = tokenizer.token_strings([int(resolved.config.get(key, -1))]) if key in resolved.config else None
        return found[0] if found and found[0] else default

    if cfg.get("resample", 3) != 3 or not cfg.get("do_resize", True) or not cfg.get("do_normalize", True):
        raise ConfigError(f"{path}: only the video processor's default bicubic resize and normalize are reproduced")
    factor = int(cfg.get("patch_size") or 16) * int(cfg.get("merge_size") or 2)
    cap = int(cfg.get("max_video_tokens") or 768) * factor * factor if cfg.get("cap_pixels_per_frame") else 0
    facts = VideoFacts(
        token=token("video_token_id", "<|video_pad|>"), token_id=int(resolved.config.get("video_token_id", -1)),
        vision_start=token("vision_start_token_id", "<|vision_start|>"),
        vision_end=token("vision_end_token_id", "<|vision_end|>"),
        fps=float(card.video_fps or cfg.get("fps") or 2.0), min_frames=int(cfg.get("min_frames") or 4),
        max_frames=int(card.video_max_frames or cfg.get("max_frames") or 768),
        min_pixels=int(size.get("shortest_edge") or 128 * 32 * 32),
        max_pixels=int(card.video_max_pixels or size.get("longest_edge") or 768 * 32 * 32), frame_cap=cap,
        mean=[float(v) for v in cfg.get("image_mean", image_cfg.get("image_mean", (0.5, 0.5, 0.5)))],
        std=[float(v) for v in cfg.get("image_std", image_cfg.get("image_std", (0.5, 0.5, 0.5)))])
    if facts.token_id < 0 or tokenizer.token_id(facts.token) != facts.token_id:
        raise ConfigError(f"{resolved.model_dir}: video_token_id {facts.token_id} is not {facts.token} in the vocabulary")
    return facts


def export_vision(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, *, opset: int, path: Path) -> None:
    """The vision graph (``VisionGraph``), dynamo-exported with dynamic patch and row axes (an example image of
    8 feature rows)."""
    from toolkit.runtime.qwen_vl import position_taps, vision_positions, window_layout

    group = spec.merge_size ** 2
    grid = (1, 4 * spec.merge_size, 2 * spec.merge_size)  # an example image: 8 feature rows
    width = 3 * spec.temporal_patch_size * spec.patch_size ** 2
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(grid[1] * grid[2], width, generator=gen)
    positions = torch.from_numpy(vision_positions(grid, spec.merge_size))
    rows = torch.export.Dim("rows")
    inputs, names = (patches, positions), ["pixel_values", "positions"]
    dynamic = {"pixel_values": {0: group * rows}, "positions": {0: group * rows}}
    if spec.window_size:
        inputs += tuple(torch.from_numpy(a) for a in window_layout(grid, spec))
        names += ["window_order", "window_ids", "restore"]
        dynamic.update({"window_order": {0: rows}, "window_ids": {0: group * rows}, "restore": {0: rows}})
    if spec.position_grid:
        inputs += tuple(torch.from_numpy(a) for a in position_taps(grid, spec.position_grid, spec.merge_size))
        names += ["position_taps", "position_weights"]
        dynamic.update({"position_taps": {0: group * rows}, "position_weights": {0: group * rows}})
    outputs = ["image_embeds", "deepstack_embeds"] if spec.deepstack else ["image_embeds"]
    with torch_onnx_boundary("of the vision graph"):
        program = torch.onnx.export(
            VisionGraph(model.visual).eval(), inputs, input_names=names, output_names=outputs,
            # by position, the layout inputs (the graph's *layout) as one group, as torch.export takes varargs
            dynamic_shapes=(dynamic[names[0]], dynamic[names[1]],
                            *((tuple(dynamic[name] for name in names[2:]),) if names[2:] else ())),
            dynamo=True, opset_version=opset, verbose=False, external_data=True)
        program.save(str(path), external_data=True)


def load_processor(resolved: ResolvedModel, spec: VisionLanguage, tokenizer):
    """transformers' image processor for the reference (Pillow backend), within the card's pixel bounds."""
    from transformers import AutoImageProcessor

    bounds = {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}  # the card's, where it sets them
    try:
        return AutoImageProcessor.from_pretrained(resolved.model_dir, backend="pil", **bounds)
    except (TypeError, ValueError):
        return AutoImageProcessor.from_pretrained(resolved.model_dir, **bounds)


def run_reference(model: nn.Module, spec: VisionLanguage, tokenizer, processor, item: dict) -> torch.Tensor:
    """The model's last hidden state for one item (1, seq, hidden): its tokenizer's chat template, transformers'
    image processor, the forward with ``mm_token_type_ids``."""
    from PIL import Image

    from toolkit.runtime.vision_language import item_messages, placeholder_images

    videos = [_video(spec, video) for video in item.get("videos", [])]
    decoded = [Image.open(io.BytesIO(data)) for data in item.get("images", [])] or \
        ([] if videos else placeholder_images(spec))
    messages = item_messages(item.get("text"), len(decoded), item.get("instruction"), spec, videos=len(videos))
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + spec.prompt_suffix
    feeds = {}
    if videos:  # each video's placeholder (start, pad, end) replaced as vLLM's Qwen3-VL processor does
        facts = spec.video
        parts = prompt.split(facts.vision_start + facts.token + facts.vision_end)
        prompt = parts[0] + "".join(text + rest for (_, _, text), rest in zip(videos, parts[1:]))
        feeds = {"pixel_values_videos": torch.cat([v[0] for v in videos]),
                 "video_grid_thw": torch.tensor([v[1] for v in videos])}
    if decoded:
        pixels = processor(images=decoded, return_tensors="np")
        grids = pixels["image_grid_thw"]
        parts = prompt.split(spec.image_token)
        counts = [int(np.prod(g)) // spec.merge_size ** 2 for g in grids]
        prompt = parts[0] + "".join(spec.image_token * n + rest for n, rest in zip(counts, parts[1:]))
        feeds.update(pixel_values=torch.from_numpy(np.asarray(pixels["pixel_values"], np.float32)),
                     image_grid_thw=torch.from_numpy(np.asarray(grids)))
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    kinds = (ids == spec.image_token_id).to(torch.int32)  # text 0, image 1, video 2
    if spec.video is not None:
        kinds += 2 * (ids == spec.video.token_id).to(torch.int32)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=kinds,
                     **feeds).last_hidden_state


def _video(spec: VisionLanguage, video: dict) -> tuple[torch.Tensor, list[int], str]:
    """One frame list through transformers' Qwen3-VL video processing: its ``smart_resize``, each frame resized
    as torchvision resizes uint8 frames (antialiased bicubic in float32, clamped, rounded: the one step done
    here, torchvision's CUDA-built wheel does not load beside a CPU torch), its fused rescale and normalize, its
    ``patchify``, and its processor's timestamps and placeholder text -> (patches, grid, placeholder text)."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
        smart_resize,
    )
    from transformers.video_utils import VideoMetadata

    facts = spec.video
    frames = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in video["frames"]])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, C, H, W)
    h, w = smart_resize(len(frames), x.shape[2], x.shape[3], temporal_factor=spec.temporal_patch_size,
                        factor=spec.patch_size * spec.merge_size, min_pixels=facts.min_pixels,
                        max_pixels=facts.max_pixels)
    x = nn.functional.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).round_()
    mean, std = torch.tensor(facts.mean) * (1 / (1 / 255)), torch.tensor(facts.std) * (1 / (1 / 255))
    x = (x - mean[:, None, None]) / std[:, None, None]
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, x[None], spec.patch_size, spec.merge_size,
                                                          spec.temporal_patch_size)
    processor = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size),
        vision_start_token=facts.vision_start, vision_end_token=facts.vision_end, video_token=facts.token,
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    metadata = VideoMetadata(total_num_frames=len(frames), fps=video["fps"], frames_indices=list(range(len(frames))))
    text = Qwen3VLProcessor.replace_video_token(processor, {"video_grid_thw": torch.tensor([[t, gh, gw]]),
                                                            "video_metadata": [metadata]}, 0)
    return patches[0], [t, gh, gw], text
