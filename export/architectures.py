"""How each architecture is exported, keyed by ``config.model_type``.

Model facts (pooling, prompts, ...) are NOT here: they live in cards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.cards import PaddingSide, Pooling
from toolkit.errors import UnsupportedArchitectureError

__all__ = ["ARCHITECTURES", "ArchSpec", "get_arch"]


@dataclass(frozen=True)
class ArchSpec:
    """Export facts for one ``model_type``.

    ``ort_fusion`` names the onnxruntime.transformers optimizer model type
    whose fusions apply (None: none do); ``decoder`` models are causal and
    default to left padding and last-token pooling.
    """

    model_type: str
    token_type_ids: bool = False
    decoder: bool = False
    ort_fusion: str | None = None
    attn_implementation: str = "eager"
    splade: bool = False  # has a masked-LM head usable for SPLADE
    position_offset: int = 0  # positions start after the padding index (RoBERTa family)
    image_tower: bool = False  # a text tower and an image tower in one shared space (CLIP, SigLIP)
    # image towers: the size rule a preprocessor config without one implies ("shortest_edge": CLIP's resize keeping
    # the aspect ratio; "fixed": height x width), and whether the ViT adds a class token to its patches
    image_resize: str = "fixed"
    image_class_token: bool = False
    pooling: Pooling | None = None  # the architecture pools by its own rule: the card cannot choose
    text_inputs: tuple[str, ...] | None = None  # the text tower's inputs, when not the usual ones
    config_overrides: dict[str, object] = field(default_factory=dict)
    # a decoder whose causal mask the export can replace by a padding-only (bidirectional) one, when the card or
    # config asks (llama-nemotron-embed, GritLM, ...): transformers' decoders accept a ready 4-D mask as-is
    bidirectional_mask: bool = False
    converted: bool = False  # not in the registry: a causal LM exported by the generic decoder path
    remote_code: bool = False  # the model's own modeling code (config auto_map), run with --trust-remote-code
    vision_language: bool = False  # a vision-language model: a vision graph and a language graph (export.vision_language)

    @property
    def padding_side(self) -> PaddingSide:
        return PaddingSide.LEFT if self.decoder else PaddingSide.RIGHT

    @property
    def inputs(self) -> tuple[str, ...]:
        if self.text_inputs is not None:
            return self.text_inputs
        base = ("input_ids", "attention_mask")
        return (*base, "token_type_ids") if self.token_type_ids else base


_DECODER = {"use_cache": False}

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("bert", token_type_ids=True, ort_fusion="bert", splade=True),
        ArchSpec("roberta", ort_fusion="bert", splade=True, position_offset=2),
        ArchSpec("xlm-roberta", ort_fusion="bert", splade=True, position_offset=2),
        ArchSpec("mpnet", position_offset=2),
        ArchSpec("modernbert"),
        ArchSpec("nomic_bert", token_type_ids=True),
        ArchSpec("gte", token_type_ids=True),
        ArchSpec("ernie", token_type_ids=True, ort_fusion="bert"),  # ERNIE 3.0 (text2vec-base-chinese-sentence)
        ArchSpec("qwen2", decoder=True, config_overrides=_DECODER, bidirectional_mask=True),
        ArchSpec("qwen3", decoder=True, config_overrides=_DECODER, bidirectional_mask=True),
        ArchSpec("llama", decoder=True, config_overrides=_DECODER, bidirectional_mask=True),
        ArchSpec("mistral", decoder=True, config_overrides=_DECODER, bidirectional_mask=True),
        ArchSpec("gemma2", decoder=True, config_overrides=_DECODER, bidirectional_mask=True),  # bge-multilingual-gemma2
        # embeddinggemma: the Gemma3 text stack with bidirectional attention,
        # which its config.json turns on (use_bidirectional_attention).
        ArchSpec("gemma3_text", config_overrides=_DECODER),
        # two towers; each graph ends in the model's own projection (get_text_features / get_image_features).
        # CLIP pools its text at the first EOS; SigLIP at the LAST position of text padded to 64 tokens, read
        # without an attention mask (as its processor feeds it).
        ArchSpec("clip", image_tower=True, pooling=Pooling.EOS, image_resize="shortest_edge", image_class_token=True),
        ArchSpec("siglip", image_tower=True, pooling=Pooling.LAST_TOKEN, text_inputs=("input_ids",)),
        # vision-language embedders (GME, DSE): the last token's state of Qwen2-VL's language model, normalized,
        # as their authors and vLLM pool them; the vision tower runs once per image (export.vision_language)
        ArchSpec("qwen2_vl", decoder=True, vision_language=True, pooling=Pooling.LAST_TOKEN,
                 text_inputs=("input_ids", "attention_mask", "position_ids", "image_embeds")),
        # Qwen2.5-VL (jina-embeddings-v4's and ColQwen2.5's base): the same, its tower attending within windows
        ArchSpec("qwen2_5_vl", decoder=True, vision_language=True, pooling=Pooling.LAST_TOKEN,
                 text_inputs=("input_ids", "attention_mask", "position_ids", "image_embeds")),
        # Qwen3-VL (Qwen3-VL-Embedding): a learned position table in the tower, and DeepStack: rows from some tower
        # layers added at the image tokens after the first language layers (the language graph's deepstack_embeds)
        ArchSpec("qwen3_vl", decoder=True, vision_language=True, pooling=Pooling.LAST_TOKEN,
                 text_inputs=("input_ids", "attention_mask", "position_ids", "image_embeds", "deepstack_embeds")),
        # LLaVA-NeXT (e5-v): a CLIP tower over the whole image and its tiles, a Llama decoder; the positions
        # (1, batch, seq) count up over each prompt's real tokens (export.llava_next)
        ArchSpec("llava_next", decoder=True, vision_language=True, pooling=Pooling.LAST_TOKEN,
                 text_inputs=("input_ids", "attention_mask", "position_ids", "image_embeds")),
    )
}


_VISION_KEYS = ("vision_config", "img_processor", "embd_layer")  # a config with a vision side


def get_arch(model_type: str, config: dict | None = None) -> ArchSpec:
    """The spec for ``model_type``. Outside the registry, ``config`` may still name a path: a causal LM
    (``*ForCausalLM``, or its base class) is exported by the generic decoder path (vLLM's ``--convert embed``), a model shipping its
    own code (``auto_map``) runs that code; anything else lists the supported architectures."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    config = config or {}
    if any(key in config for key in _VISION_KEYS):  # Phi-3-V (VLM2Vec), Llama-Nemotron-VL, ...: their code is remote
        vision_language = sorted(k for k, spec in ARCHITECTURES.items() if spec.vision_language)
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is a vision-language model this toolkit does not export yet (exported as a "
            "text model, its images would be dropped); vision-language architectures supported: "
            f"{', '.join(vision_language)} (and CLIP / SigLIP's two towers)")
    if "AutoModel" in (config.get("auto_map") or {}):
        return ArchSpec(model_type, token_type_ids="type_vocab_size" in config, remote_code=True,
                        decoder=_causal_lm(config), config_overrides=_DECODER if _causal_lm(config) else {})
    if _causal_lm(config):
        return ArchSpec(model_type, decoder=True, config_overrides=_DECODER, bidirectional_mask=True, converted=True)
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitectureError(
        f"architecture '{model_type}' is not supported; supported: {supported}, and any causal LM "
        "(a *ForCausalLM or its base model, converted to embeddings)"
    )


def _causal_lm(config: dict) -> bool:
    """A decoder: saved as its ``*ForCausalLM`` class, or as its base class (``GraniteModel``, ``Olmo2Model``, as
    many embedding checkpoints are) of a model type transformers knows as a causal LM and not as a masked LM
    (encoders such as BERT have both heads and are not decoders)."""
    if any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = str(config.get("model_type"))
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
