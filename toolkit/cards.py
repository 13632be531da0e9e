"""Model cards: what a model IS (pooling, normalization, prompts, dimensions).

Cards live in ``model_cards/*.toml`` and inside each artifact's manifest.
Decoding is strict: an unknown key is an error.
"""

from __future__ import annotations

import enum
import sys
from importlib import resources
from pathlib import Path
from typing import Literal

import msgspec

from toolkit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ACTIVATIONS", "ModelCard", "PaddingSide", "Pooling", "list_cards", "load_card", "parse_pooling"]


class Pooling(str, enum.Enum):
    """How token states become the model's output (vLLM's pooling methods; llama.cpp's ``rank``)."""

    CLS = "cls"
    MEAN = "mean"
    LAST_TOKEN = "last_token"
    SPLADE = "splade"
    EOS = "eos"  # CLIP's text tower: the first end-of-text token's state
    RANK = "rank"  # a cross-encoder: the model's sequence-classification head scores (query, document) pairs


ACTIVATIONS = ("identity", "sigmoid", "softmax", "tanh")


class PaddingSide(str, enum.Enum):
    RIGHT = "right"
    LEFT = "left"


def parse_pooling(value: str) -> Pooling:
    """Parse a pooling name, listing the valid ones when it is not one."""
    try:
        return Pooling(value)
    except ValueError:
        valid = ", ".join(p.value for p in Pooling)
        raise ConfigError(f"pooling '{value}' is not one of: {valid}") from None


class ModelCard(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The facts about a model that a user would otherwise pass by flag."""

    name: str
    source: str | None = None  # Hugging Face Hub id
    pooling: Pooling | None = None
    # a late-interaction model (ColBERT, ColVision): it pools nothing, one vector per token; its modes, lengths and
    # prompts come from the checkpoint's own files (export.late_interaction, export.colvision)
    late_interaction: bool = False
    normalize: bool = True
    max_seq_len: int | None = None
    padding_side: PaddingSide = PaddingSide.RIGHT
    pad_to_max_length: bool = False  # text is padded to max_seq_len, as the model was trained (SigLIP: 64)
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None
    # a prompt name that picks a LoRA adapter the artifact carries (jina-embeddings-v3: each task its prompt and
    # its adapter; the adapter's name picks its prompt the other way)
    prompt_adapters: dict[str, str] = {}
    matryoshka_dims: list[int] = []
    matryoshka_any: bool = False
    bidirectional: bool = False  # a decoder embedding model that reads with a padding-only mask (no causal mask)
    # mean pooling skips the instruction: the tokens up to the first occurrence of these (GritLM's "<|embed|>\n"
    # marker, as vLLM's GritLM pooler finds it); token strings of the model's vocabulary
    instruction_end_tokens: list[str] = []
    activation: str | None = None  # rank: applied to the logits (sentence-transformers' CrossEncoder decides it;
    # a text classifier: transformers' text-classification pipeline)
    # vision-language embedders: text after the rendered chat template (GME and DSE end their prompts with
    # <|endoftext|>, whose state is pooled); None: <|endoftext|> where the vocabulary has it
    prompt_suffix: str | None = None
    # vision-language embedders: the pixel bounds images are resized within, where the model's authors set their
    # own (GME: 256 to 1280 image tokens of 28 x 28 pixels); None: preprocessor_config.json's
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    # vision-language embedders: where the instruction (a prompt) goes: "system", the system message (GME,
    # Qwen3-VL), or "text", before the item's text in the user turn (DSE: "Query: ...")
    instruction_at: Literal["system", "text"] = "system"
    image_only_text: str = ""  # the text of an item that has only images (DSE: "What is shown in this image?")
    placeholder_image: int = 0  # a black square of this side stands in an item without images (DSE: 56); 0: none
    # vision-language embedders prompted without a chat (e5-v): the prompt per kind of item ("text", "image",
    # "multimodal"), {text} its text (after the instruction), {image} the image token once per image; a kind
    # without a template is refused
    item_templates: dict[str, str] = {}
    # Qwen3-VL videos, where the model's authors sample their own way (Qwen3-VL-Embedding: 1 frame a second, at
    # most 64 frames, 10 x 768 x 32 x 32 pixels over all frames); None: video_preprocessor_config.json's
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_max_pixels: int | None = None
    labels: list[str] = []  # sequence classifiers: the label of each logit (config id2label, in id order)
    description: str = ""


def _cards_dir() -> Path:
    return Path(str(resources.files("toolkit.model_cards")))


def list_cards() -> dict[str, Path]:
    """Every bundled card, keyed by its file stem."""
    return {p.stem: p for p in sorted(_cards_dir().glob("*.toml"))}


def load_card(name_or_path: str | Path) -> ModelCard:
    """Load a card by bundled name, Hub id (``source``) or TOML path.

    Raises ConfigError naming the bundled cards when none matches.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.is_file():
        cards = list_cards()
        key = str(name_or_path)
        path = cards.get(key) or cards.get(key.rsplit("/", 1)[-1])
        if path is None:
            raise ConfigError(f"no model card '{name_or_path}'; bundled: {', '.join(cards)}")
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, ModelCard)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"model card {path.name}: {exc}") from None


def find_card(name: str) -> ModelCard | None:
    """The bundled card whose stem or ``source`` matches ``name``, if any."""
    short = name.rstrip("/").rsplit("/", 1)[-1]
    for stem, path in list_cards().items():
        if stem in (name, short):
            return load_card(path)
    for path in list_cards().values():
        card = load_card(path)
        if card.source and (card.source == name or card.source.rsplit("/", 1)[-1] == short):
            return card
    return None
