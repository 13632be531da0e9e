"""LLaVA-NeXT embedders (e5-v): the family's export half (``toolkit.vision_families``): its vision graph, its
manifest facts and the transformers reference.

The language graph is ``export.vision_language.LanguageGraph``, as for Qwen-VL (its positions one axis here). The
vision graph takes ONE image's views (the whole image squashed to the tower's side, then its tiles; as
``runtime.llava_next.preprocess_llava_next`` makes them) and its feature layout, runs the CLIP tower up to the
config's ``vision_feature_layer`` (the layers after it are never run), drops the class token, projects, and
gathers the rows in prompt order with the learned newline row after each row of the tile map: what transformers'
``get_image_features`` + ``pack_image_features`` compute with Python loops over images and tiles.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ConfigError
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ParityReport, VisionLanguage

__all__ = ["POSITION_AXES", "LlavaNextVisionGraph", "build_spec", "export_vision", "load_processor", "run_reference"]

POSITION_AXES = 1  # a plain decoder: its positions count up over each prompt's real tokens


class LlavaNextVisionGraph(nn.Module):
    """One image: views (n, 3, side, side) and its layout (rows,) -> its feature rows (rows, hidden)."""

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        super().__init__()
        self.tower, self.projector, self.newline = model.vision_tower, model.multi_modal_projector, model.image_newline
        count = len(self.tower.encoder.layers)
        self.taps = [layer % (count + 1) for layer in layers]  # hidden_states indices: 0 is the embeddings

    def forward(self, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        states = [hidden]
        for layer in tower.encoder.layers[:max(self.taps)]:
            hidden = layer(hidden, None)
            states.append(hidden)
        chosen = torch.cat([states[t] for t in self.taps], dim=-1)[:, 1:]  # the class token dropped ("default")
        rows = self.projector(chosen).flatten(0, 1)
        return torch.cat([rows, self.newline[None].to(rows.dtype)])[layout]


def build_spec(resolved: ResolvedModel, cfg: dict, tokenizer, token: str, token_id: int,
               resample: str) -> VisionLanguage:
    """The manifest's facts for a LLaVA-NeXT checkpoint (``cfg``: its preprocessor_config.json; the prompt's
    tokens come from the card, so ``tokenizer`` is not read)."""
    config, card = resolved.config, resolved.card
    vision = config.get("vision_config") or {}
    where = resolved.model_dir / "preprocessor_config.json"
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"{resolved.model_dir}: LLaVA-NeXT with a {vision.get('model_type')} tower; only CLIP's "
                          "(e5-v's, llava-v1.6's) is exported")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{resolved.model_dir}: vision_feature_select_strategy "
                          f"'{config.get('vision_feature_select_strategy')}'; only 'default' (the class token dropped) "
                          "is exported")
    crop = int((cfg.get("crop_size") or {}).get("height") or vision.get("image_size") or 336)
    size = cfg.get("size") or {}
    if int(size.get("shortest_edge") or size.get("height") or crop) != crop or crop != int(vision.get("image_size", crop)):
        raise ConfigError(f"{where}: size {size} and crop_size {crop} differ from the tower's side "
                          f"{vision.get('image_size')}; only the processor that tiles at the tower's side is reproduced")
    pinpoints = config.get("image_grid_pinpoints") or cfg.get("image_grid_pinpoints")
    if not pinpoints or any(h % crop or w % crop for h, w in pinpoints):
        raise ConfigError(f"{resolved.model_dir}: image_grid_pinpoints {pinpoints} must be multiples of {crop}")
    return VisionLanguage(
        family="llava_next", image_token=token, image_token_id=token_id, prompt_suffix=card.prompt_suffix or "",
        instruction_at=card.instruction_at, image_only_text=card.image_only_text,
        placeholder_image=card.placeholder_image, templates=dict(card.item_templates), crop_size=crop,
        grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints], patch_size=int(vision.get("patch_size", 14)),
        merge_size=1, temporal_patch_size=1, min_pixels=0, max_pixels=0,
        mean=[float(v) for v in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))],
        std=[float(v) for v in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))],
        resample=resample, hidden_size=resolved.head.dim(resolved.config, None),
        parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False))


def _feature_layers(config: dict) -> list[int]:
    layers = config.get("vision_feature_layer", -2)
    return [int(layers)] if isinstance(layers, int) else [int(v) for v in layers]


def export_vision(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, *, opset: int, path: Path) -> None:
    """The vision graph, dynamo-exported with dynamic view and row axes (an example image two tiles wide)."""
    from toolkit.runtime.llava_next import LlavaNextImages, feature_layout

    side = spec.crop_size
    layout = torch.from_numpy(feature_layout(side, 2 * side, LlavaNextImages(spec).image_spec))
    views = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    graph = LlavaNextVisionGraph(model, _feature_layers(resolved.config)).eval()
    with torch_onnx_boundary("of the vision graph"):
        program = torch.onnx.export(
            graph, (views, layout), input_names=["pixel_values", "layout"], output_names=["image_embeds"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("views")}, "layout": {0: torch.export.Dim("rows")}},
            dynamo=True, opset_version=opset, verbose=False, external_data=True)
        program.save(str(path), external_data=True)


def load_processor(resolved: ResolvedModel, spec: VisionLanguage, tokenizer):
    """transformers' own processor for the checkpoint: its Pillow image processor, and the token counts its
    processor class computes, told the tower's facts (e5-v's processor config lacks the patch size, which vLLM's
    own test patches in the same way)."""
    from transformers import AutoImageProcessor, LlavaNextProcessor

    try:
        images = AutoImageProcessor.from_pretrained(resolved.model_dir, backend="pil")
    except (TypeError, ValueError):
        images = AutoImageProcessor.from_pretrained(resolved.model_dir)
    images.image_grid_pinpoints = spec.grid_pinpoints  # the model config's, as the model itself tiles
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=spec.patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def run_reference(model: nn.Module, spec: VisionLanguage, tokenizer, processor, item: dict) -> torch.Tensor:
    """The model's last hidden state for one item (1, seq, hidden): the card's prompt (or the tokenizer's chat template),
    transformers' processor (its image processor and its count of image tokens), the forward."""
    from PIL import Image

    from toolkit.runtime.vision_language import item_messages, placeholder_images, template_prompt

    if spec.image_token_id >= model.get_input_embeddings().num_embeddings:
        # e5-v's image token (128256) is past its embedding table: grow the table by the unused row, as vLLM's own
        # test_llava_next.py does before running transformers (the graph never looks that row up)
        model.resize_token_embeddings(spec.image_token_id + 1, mean_resizing=False)
    decoded = [Image.open(io.BytesIO(data)) for data in item.get("images", [])] or placeholder_images(spec)
    if spec.templates:
        prompt, special = template_prompt(item.get("text"), len(decoded), item.get("instruction"), spec), True
    else:
        messages = item_messages(item.get("text"), len(decoded), item.get("instruction"), spec)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + spec.prompt_suffix
        special = False
    feeds = processor(text=[prompt], images=decoded or None, return_tensors="pt", add_special_tokens=special)
    with torch.no_grad():
        return model(**feeds).last_hidden_state
