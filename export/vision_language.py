"""Vision-language embedders (Qwen-VL: GME, DSE, Qwen3-VL-Embedding; LLaVA-NeXT: e5-v) as two graphs, verified
against transformers.

- the vision graph (``<name>.image.onnx``): one image's pixels as the runtime lays them out -> its feature rows,
  one per prompt placeholder, in prompt order: the family's own (``export_vision`` of its export half, found in
  ``toolkit.vision_families``), so the graph holds no per-image Python loop and the runtime runs it once per image;
- the language graph (the artifact, ``LanguageGraph``): token ids, attention mask, positions (the family's
  ``POSITION_AXES``, batch, seq) and every image's feature rows in prompt order -> the rows placed where the image
  tokens are, the language model, then the dense head's last-token pooling, Matryoshka slices and normalization
  (``export.heads.VisionLanguageHead``);
- ``vision_language_spec``: the processor's and prompt's facts the runtime needs (the manifest's
  ``vision_language``): the checks every family shares here, its own facts from its half's ``build_spec``;
- the verification against transformers is ``export.vision_language_parity``.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Iterator
from pathlib import Path

import msgspec
import torch
from torch import nn

from toolkit.cards import ModelCard
from toolkit.errors import ConfigError
from toolkit.export.graph import padding_only_mask
from toolkit.export.heads import Head
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import VisionLanguage
from toolkit.vision_families import load_half

__all__ = ["LanguageGraph", "export_vision_language_graphs", "load_vision_language", "vision_language_spec"]
_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class LanguageGraph(nn.Module):
    """Token ids with image placeholders, their mask and positions ((axes, batch, seq): M-RoPE's 3 axes, or 1), and
    the images' feature rows (in prompt order over the batch, row-major; one unused row when there are none) -> the
    head's outputs."""

    def __init__(self, model: nn.Module, image_token_id: int, head: Head, card: ModelCard, *, axes: int = 3,
                 dense: nn.Module | None = None, bidirectional: bool = False) -> None:
        super().__init__()
        self.model, self.head, self.card = model, head, card
        self.dense = dense if dense is not None else nn.Identity()  # ColVision's per-token projection
        self.bidirectional = bidirectional  # a padding-only mask (PaliGemma's prefix), else the decoder's causal one
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
        mask = padding_only_mask(attention_mask) if self.bidirectional else attention_mask
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                           position_ids=positions, **extra).last_hidden_state
        return self.head.forward(BaseModelOutput(last_hidden_state=hidden), attention_mask, self.dense, self.card)


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
    """The checkpoint's vision-language model (``Qwen2VLModel``), fp32, eval mode, whichever class saved it; a
    ColVision retriever whole (``ColQwen2ForRetrieval``: its ``vlm`` and ``embedding_proj_layer``)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if "colvision" in resolved.config:  # export.colvision.read_colvision names the kind there
        from toolkit.export.colvision import load_colvision

        return load_colvision(resolved.transformer_dir, resolved.config["colvision"])
    try:
        full = AutoModelForImageTextToText.from_pretrained(resolved.transformer_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{resolved.transformer_dir}: cannot load the model: {exc}") from None
    return full.model.eval()


def vision_language_spec(resolved: ResolvedModel, tokenizer) -> VisionLanguage:
    """The manifest's ``vision_language`` facts from config.json, preprocessor_config.json and the vocabulary
    (``tokenizer``: the artifact's ``runtime.tokenization.Tokenizer``)."""
    cfg = _image_processor_config(resolved.model_dir)
    token_id = int(resolved.config.get("image_token_id", resolved.config.get("image_token_index", -1)))
    (token,) = tokenizer.token_strings([token_id]) if 0 <= token_id < tokenizer.vocab_size else (None,)
    if token is None:
        raise ConfigError(f"{resolved.model_dir}: image_token_id {token_id} is not in the tokenizer's vocabulary")
    resample = cfg.get("resample", 3)
    if resample not in _FILTERS:
        raise ConfigError(f"{resolved.model_dir}: the image processor's resample {resample} is not one of Pillow's "
                          "filters 0..5")
    if not cfg.get("do_resize", True) or not cfg.get("do_normalize", True) or not cfg.get("do_rescale", True):
        raise ConfigError(f"{resolved.model_dir}: only the processor's default resize, rescale and normalize are "
                          "reproduced")
    family = load_half(resolved.arch.model_type, "export")
    spec = family.build_spec(resolved, cfg, tokenizer, token, token_id, _FILTERS[resample])
    if "colvision" in resolved.config:  # the processor's prompts, not a chat (export.colvision)
        from toolkit.export.colvision import colvision_templates

        templates = colvision_templates(resolved.model_dir, resolved.config["colvision"],
                                        resolved.files.special_tokens, token)
        spec = msgspec.structs.replace(spec, templates=templates, prompt_suffix="", max_images=1,
                                       sequential_positions=True,
                                       # ColPaliProcessor turns the tokenizer's bos off and writes its own
                                       template_specials=resolved.config["colvision"] != "colpali")
    return spec


def _image_processor_config(model_dir: Path) -> dict:
    """The image processor's settings: preprocessor_config.json, or the ``image_processor`` of the processor's
    processor_config.json (transformers 5 saves a processor's parts there)."""
    path = model_dir / "preprocessor_config.json"
    processor = model_dir / "processor_config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text())
        if processor.is_file() and isinstance(cfg := json.loads(processor.read_text()).get("image_processor"), dict):
            return cfg
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the image processor's settings in {model_dir}: {exc}") from None
    raise ConfigError(f"{model_dir}: no preprocessor_config.json: the image preprocessing is unknown")


def export_vision_language_graphs(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, *, opset: int,
                                  tmp: Path) -> tuple[Path, Path]:
    """(language graph, vision graph), dynamo-exported with dynamic batch, sequence, patch and row axes."""
    vision_path, language_path = tmp / "image.onnx", tmp / "graph.onnx"
    dense = None
    if hasattr(model, "embedding_proj_layer"):  # ColQwen2ForRetrieval: its vision-language model and projection
        model, dense = model.vlm, model.embedding_proj_layer
    family = load_half(spec.family, "export")
    family.export_vision(model, resolved, spec, opset=opset, path=vision_path)
    gen = torch.Generator().manual_seed(0)
    features, axes = 8, family.POSITION_AXES
    ids = torch.randint(5, 200, (2, features + 6), generator=gen)
    ids[0, 2:2 + features] = spec.image_token_id
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(axes, 2, -1).contiguous()
    embeds = torch.randn(features, spec.hidden_size, generator=gen)
    batch, seq, image_rows = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("image_rows")
    graph = LanguageGraph(model, spec.image_token_id, resolved.head, resolved.card, axes=axes, dense=dense,
                          bidirectional=getattr(family, "BIDIRECTIONAL", False)).eval()
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
