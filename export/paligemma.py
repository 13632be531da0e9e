"""PaliGemma (ColPali's base): the family's export half (``toolkit.vision_families``): its vision graph and its
manifest facts.

The vision graph takes ONE image, resized to the tower's side as SigLIP's image processor does
(``runtime.paligemma``), runs the SigLIP tower and the linear projector: one row per patch, each image's
``image_seq_length`` rows, what ``PaliGemmaModel.get_image_features`` returns. The language graph is
``export.vision_language.LanguageGraph`` (one position axis, 1-based as PaliGemma counts), reading every real token
bidirectionally (``bidirectional``): transformers' PaliGemma attends within the prefix both ways, and ColPali's
prompts are all prefix (their token_type_ids are 0). Only ColPali (``export.colvision``) exports this family: a
PaliGemma generator has no embedding to serve.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ConfigError
from toolkit.export.heads import language_width
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ParityReport, VisionLanguage

__all__ = ["POSITION_AXES", "PaliGemmaVisionGraph", "build_spec", "export_vision", "load_processor", "run_reference"]

POSITION_AXES = 1
BIDIRECTIONAL = True  # the language graph reads with a padding-only mask (the whole prompt is PaliGemma's prefix)


class PaliGemmaVisionGraph(nn.Module):
    """One image: pixels (1, 3, side, side) -> its rows (patches, hidden): the SigLIP tower, then the projector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower, self.projector = model.vision_tower, model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values).last_hidden_state)[0]


def build_spec(resolved: ResolvedModel, cfg: dict, tokenizer, token: str, token_id: int,
               resample: str) -> VisionLanguage:
    """The manifest's facts (``cfg``: the image processor's settings: SigLIP's fixed resize)."""
    vision = resolved.config.get("vision_config") or {}
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"{resolved.model_dir}: PaliGemma with a {vision.get('model_type')} tower; only SigLIP's")
    size = cfg.get("size") or {}
    side = int(vision.get("image_size") or 224)
    if (int(size.get("height", side)), int(size.get("width", side))) != (side, side):
        raise ConfigError(f"{resolved.model_dir}: the image processor resizes to {size}, the tower reads "
                          f"{side} x {side}")
    patch = int(vision.get("patch_size") or 14)
    rows = int(cfg.get("image_seq_length") or (side // patch) ** 2)
    if rows != (side // patch) ** 2:
        raise ConfigError(f"{resolved.model_dir}: image_seq_length {rows} is not the tower's "
                          f"{(side // patch) ** 2} patches")
    return VisionLanguage(
        family="paligemma", image_token=token, image_token_id=token_id, crop_size=side, patch_size=patch,
        merge_size=1, temporal_patch_size=1, min_pixels=rows, max_pixels=rows,
        mean=[float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5))],
        std=[float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5))], resample=resample,
        hidden_size=language_width(resolved.config),
        parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False))


def export_vision(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, *, opset: int, path: Path) -> None:
    """The vision graph, dynamo-exported (one image of the tower's fixed side)."""
    side = spec.crop_size
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch_onnx_boundary("of the vision graph"):
        program = torch.onnx.export(PaliGemmaVisionGraph(model).eval(), (pixels,), input_names=["pixel_values"],
                                    output_names=["image_embeds"], dynamo=True, opset_version=opset, verbose=False,
                                    external_data=True)
        program.save(str(path), external_data=True)


def load_processor(resolved: ResolvedModel, spec: VisionLanguage, tokenizer):
    raise ConfigError("a PaliGemma generator has no embedding to serve; ColPali checkpoints export (export.colvision)")


def run_reference(model, spec, tokenizer, processor, item):
    raise ConfigError("a PaliGemma generator has no embedding to serve; ColPali checkpoints export (export.colvision)")
