"""Vision-language embedders (Qwen2-VL: GME, DSE) as two graphs, verified against transformers.

- the vision graph (``<name>.image.onnx``): one image's patches (as ``runtime.qwen_vl.preprocess_qwen_vl`` lays
  them out) and their (row, column) positions -> its feature rows, one per prompt placeholder. It is transformers'
  vision tower with its attention written over the one image, so the graph holds no per-image Python loop and
  the runtime runs it once per image;
- the language graph (the artifact): token ids, attention mask, M-RoPE positions (3, batch, seq) and every image's
  feature rows in prompt order -> the rows placed where the image tokens are, the language model, then the dense
  head's last-token pooling, Matryoshka slices and normalization (``export.heads.VisionLanguageHead``);
- ``vision_language_spec``: the processor's and prompt's facts the runtime needs (the manifest's
  ``vision_language``);
- the verification against transformers is ``export.vision_language_parity``; LLaVA-NeXT's own vision graph and
  facts are ``export.llava_next``.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from toolkit.cards import ModelCard
from toolkit.errors import ConfigError
from toolkit.export.heads import Head
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ParityReport, VideoFacts, VisionLanguage

__all__ = ["LanguageGraph", "VisionGraph", "export_vision_language_graphs", "load_vision_language",
           "vision_language_spec"]
_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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


class LanguageGraph(nn.Module):
    """Token ids with image placeholders, their mask and M-RoPE positions, and the images' feature rows (in prompt
    order over the batch, row-major; one unused row when there are none) -> the head's outputs."""

    def __init__(self, model: nn.Module, image_token_id: int, head: Head, card: ModelCard, *, axes: int = 3) -> None:
        super().__init__()
        self.model, self.head, self.card = model, head, card
        self.image_token_id, self.axes = image_token_id, axes  # M-RoPE's 3 position axes, or 1 (LLaVA-NeXT)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                image_embeds: torch.Tensor, deepstack_embeds: torch.Tensor | None = None):
        from transformers.modeling_outputs import BaseModelOutput

        is_image = input_ids == self.image_token_id
        # the placeholder's own row is never used (e5-v's image token is past its embedding table)
        embeds = self.model.get_input_embeddings()(torch.where(is_image, 0, input_ids))
        # the k-th placeholder (row-major over the batch) takes the k-th feature row, as masked_scatter places them
        index = (is_image.reshape(-1).to(torch.int64).cumsum(0) - 1).clamp(min=0).reshape(input_ids.shape)
        embeds = torch.where(is_image.unsqueeze(-1), image_embeds[index], embeds)
        extra = {}
        if deepstack_embeds is not None:  # Qwen3-VL: added at the image tokens after the first layers
            extra = {"visual_pos_masks": is_image,
                     "deepstack_visual_embeds": [deepstack_embeds[k] for k in range(deepstack_embeds.shape[0])]}
        positions = position_ids if self.axes == 3 else position_ids[0]
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                           position_ids=positions, **extra).last_hidden_state
        return self.head.forward(BaseModelOutput(last_hidden_state=hidden), attention_mask, nn.Identity(), self.card)


def _placed_add(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
    """DeepStack's addition at the image tokens written with a gather (transformers' boolean-mask assignment has a
    data-dependent shape, which the exporter cannot trace): the k-th image token gets the k-th row."""
    index = (visual_pos_masks.reshape(-1).to(torch.int64).cumsum(0) - 1).clamp(min=0).reshape(visual_pos_masks.shape)
    return hidden_states + torch.where(visual_pos_masks.unsqueeze(-1), visual_embeds[index], 0.0)


@contextlib.contextmanager
def _traceable_deepstack(model: nn.Module) -> Iterator[None]:
    """The language model's DeepStack step as ``_placed_add`` while the graph is exported (then the model's own
    again, so the parity reference runs transformers' code)."""
    language = model.language_model
    if not hasattr(language, "_deepstack_process"):
        yield
        return
    language._deepstack_process = types.MethodType(_placed_add, language)
    try:
        yield
    finally:
        del language._deepstack_process


def load_vision_language(resolved: ResolvedModel) -> nn.Module:
    """The checkpoint's vision-language model (``Qwen2VLModel``), fp32, eval mode, whichever class saved it."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        full = AutoModelForImageTextToText.from_pretrained(resolved.transformer_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{resolved.transformer_dir}: cannot load the model: {exc}") from None
    return full.model.eval()


def vision_language_spec(resolved: ResolvedModel, tokenizer) -> VisionLanguage:
    """The manifest's ``vision_language`` facts from config.json, preprocessor_config.json and the vocabulary
    (``tokenizer``: the artifact's ``runtime.tokenization.Tokenizer``)."""
    path = resolved.model_dir / "preprocessor_config.json"
    if not path.is_file():
        raise ConfigError(f"{resolved.model_dir}: no preprocessor_config.json: the image preprocessing is unknown")
    cfg = json.loads(path.read_text())
    vision = resolved.config.get("vision_config") or {}
    token_id = int(resolved.config.get("image_token_id", resolved.config.get("image_token_index", -1)))
    (token,) = tokenizer.token_strings([token_id]) if 0 <= token_id < tokenizer.vocab_size else (None,)
    if token is None:
        raise ConfigError(f"{resolved.model_dir}: image_token_id {token_id} is not in the tokenizer's vocabulary")
    resample = cfg.get("resample", 3)
    if resample not in _FILTERS:
        raise ConfigError(f"{path}: resample {resample} is not one of Pillow's filters 0..5")
    if not cfg.get("do_resize", True) or not cfg.get("do_normalize", True) or not cfg.get("do_rescale", True):
        raise ConfigError(f"{path}: only the processor's default resize, rescale and normalize are reproduced")
    if resolved.arch.model_type == "llava_next":
        from toolkit.export.llava_next import llava_next_spec

        return llava_next_spec(resolved, cfg, token, token_id, _FILTERS[resample])
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
        resample=_FILTERS[resample], hidden_size=resolved.head.dim(resolved.config, None),
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


def export_vision_language_graphs(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, *, opset: int,
                                  tmp: Path) -> tuple[Path, Path]:
    """(language graph, vision graph), dynamo-exported with dynamic batch, sequence, patch and row axes."""
    vision_path, language_path = tmp / "image.onnx", tmp / "graph.onnx"
    if spec.family == "llava_next":
        from toolkit.export.llava_next import export_llava_next_vision

        export_llava_next_vision(model, resolved, spec, opset=opset, path=vision_path)
    else:
        _export_qwen_vision(model, spec, opset=opset, path=vision_path)
    gen = torch.Generator().manual_seed(0)
    features, axes = 8, 1 if spec.family == "llava_next" else 3
    ids = torch.randint(5, 200, (2, features + 6), generator=gen)
    ids[0, 2:2 + features] = spec.image_token_id
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(axes, 2, -1).contiguous()
    embeds = torch.randn(features, spec.hidden_size, generator=gen)
    batch, seq, image_rows = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("image_rows")
    graph = LanguageGraph(model, spec.image_token_id, resolved.head, resolved.card, axes=axes).eval()
    inputs = (ids, mask, position_ids, embeds)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
               "position_ids": {1: batch, 2: seq}, "image_embeds": {0: image_rows}}
    if spec.deepstack:
        inputs += (torch.randn(spec.deepstack, features, spec.hidden_size, generator=gen),)
        dynamic["deepstack_embeds"] = {1: image_rows}
    with torch_onnx_boundary("of the language graph"), _traceable_deepstack(model):
        program = torch.onnx.export(
            graph, inputs, input_names=list(resolved.arch.inputs), output_names=resolved.head.outputs(resolved.card),
            dynamic_shapes=dynamic, dynamo=True, opset_version=opset, verbose=False, external_data=True)
        program.save(str(language_path), external_data=True)
    return language_path, vision_path


def _export_qwen_vision(model: nn.Module, spec: VisionLanguage, *, opset: int, path: Path) -> None:
    """Qwen-VL's vision graph (``VisionGraph``), an example image of 8 feature rows."""
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
