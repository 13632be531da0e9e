"""ColVision retrievers (transformers' ``ColQwen2ForRetrieval``: ColQwen2, ColQwen2.5; ``ColPaliForRetrieval``):
a vision-language model (Qwen2-VL / Qwen2.5-VL, or PaliGemma) whose every position's last state goes through
``embedding_proj_layer`` (to 128), L2-normalized and zeroed where the attention mask is 0: late interaction over
document images.

They export on the vision-language path (``export.vision_language``: the family's vision graph, the language graph)
with ``ColVisionHead`` in place of last-token pooling. The prompts are the processor's (``ColQwen2Processor`` /
``ColPaliProcessor``), read from the checkpoint's ``processor_config.json`` (transformers' defaults where absent)
and recorded as the manifest's item templates, so the runtime renders each item as the processor does:

- a text (``process_queries``): ``query_prefix + text + pad_token * 10 + "\\n"`` (ColPali's starts with its bos;
  the query augmentation tokens are real tokens: attended and scored);
- an image (``process_images``): ColQwen2's ``visual_prompt_prefix``, its one image token expanded to the image's
  rows; ColPali's image tokens, bos, ``visual_prompt_prefix`` and a newline.

The processors have no other forms (a text is always read as a query, an image as a document page), so the modes
(``is_query``) change nothing here; a text with images in one item is refused (no such prompt).

Verification (``export.colvision_parity``): per-token vectors of texts and images, alone and batched, and MaxSim
(``score_retrieval``), against the model and its processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from toolkit.errors import ConfigError
from toolkit.manifest import LateInteraction

__all__ = ["COLVISION_TYPES", "QUERY_AUGMENTATION", "colvision_arch", "colvision_templates", "is_colvision",
           "load_colvision", "read_colvision"]

# config.json model_type -> the vision-language model types its vlm_config may be, its model and processor classes
COLVISION_TYPES = {"colqwen2": (("qwen2_vl", "qwen2_5_vl"), "ColQwen2ForRetrieval", "ColQwen2Processor"),
                   "colpali": (("paligemma",), "ColPaliForRetrieval", "ColPaliProcessor")}
QUERY_AUGMENTATION = 10  # pad tokens after a query's text (the processors' query_augmentation_token * 10)
# the processors' defaults where processor_config.json has none: (query_prefix, visual_prompt_prefix)
_DEFAULT_PROMPTS = {
    "colqwen2": ("Query: ", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image."
                            "<|im_end|><|endoftext|>"),
    "colpali": ("Question: ", "Describe the image."),
}


def is_colvision(config: dict) -> bool:
    return config.get("model_type") in COLVISION_TYPES


def read_colvision(model_dir: Path, config: dict) -> tuple[dict, int, LateInteraction]:
    """(the vision-language model's config, the projection's width, the late-interaction facts) of a ColVision
    checkpoint's config.json."""
    kind = config.get("model_type")
    vlm = config.get("vlm_config")
    allowed = COLVISION_TYPES[kind][0]
    if not isinstance(vlm, dict) or vlm.get("model_type") not in allowed:
        raise ConfigError(f"{model_dir}: a {kind} checkpoint needs vlm_config of a {' or '.join(allowed)} model; got "
                          f"{vlm.get('model_type') if isinstance(vlm, dict) else vlm!r}")
    dim = int(config.get("embedding_dim") or 128)
    return {**vlm, "colvision": kind}, dim, LateInteraction(prompts={}, similarity="maxsim")


def colvision_arch(config: dict):
    """The ArchSpec of a ColVision checkpoint's vision-language model where the registry has none (PaliGemma: only
    ColPali exports it); None otherwise."""
    if config.get("colvision") != "colpali":
        return None
    from toolkit.export.architectures import ArchSpec

    return ArchSpec("paligemma", vision_language=True,
                    text_inputs=("input_ids", "attention_mask", "position_ids", "image_embeds"))


def processor_config(model_dir: Path) -> dict:
    """The checkpoint's processor_config.json (``{}`` if it has none)."""
    path = model_dir / "processor_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def colvision_templates(model_dir: Path, kind: str, special_tokens: dict, image_token: str) -> dict[str, str]:
    """The manifest's item templates: ``text`` (a query, as
    ``process_queries`` writes it) and ``image`` (a page, as ``process_images``), ``{text}`` / ``{image}`` where
    the text and the image's tokens go; ``special_tokens``: the tokenizer's (the pad token is the query
    augmentation token; ColPali's prompts start with its bos token)."""
    cfg = processor_config(model_dir)
    default_query, default_visual = _DEFAULT_PROMPTS[kind]
    prefix = cfg.get("query_prefix") or default_query
    visual = cfg.get("visual_prompt_prefix") or default_visual
    pad = special_tokens.get("pad_token")
    if pad is None:
        raise ConfigError(f"{model_dir}: the tokenizer has no pad token (the query augmentation token)")
    suffix = pad * QUERY_AUGMENTATION + "\n"
    if kind == "colpali":  # ColPaliProcessor: bos + prefix + text + suffix + "\n"; images: image tokens, bos, prompt
        bos = special_tokens.get("bos_token")
        if bos is None:
            raise ConfigError(f"{model_dir}: the tokenizer has no bos token (ColPali's prompts start with it)")
        return {"text": bos + prefix + "{text}" + suffix, "image": "{image}" + bos + visual + "\n"}
    if visual.count(image_token) != 1:
        raise ConfigError(f"{model_dir}: visual_prompt_prefix holds {visual.count(image_token)} image tokens "
                          f"({image_token}); one is read")
    return {"text": prefix + "{text}" + suffix, "image": visual.replace(image_token, "{image}")}


def load_colvision(model_dir: Path, kind: str) -> torch.nn.Module:
    """``ColQwen2ForRetrieval`` / ``ColPaliForRetrieval`` (``kind``'s) in fp32, eval mode."""
    import transformers

    try:
        return getattr(transformers, COLVISION_TYPES[kind][1]).from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir}: cannot load the model: {exc}") from None
