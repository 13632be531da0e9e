"""Vision-language embedders verified against transformers: the artifact's ``Embedder.embed`` on text-only,
image-only and text + image items (images of awkward kinds and mixed sizes, batched and alone) vs the model's own
forward on transformers' image processor's pixels and its tokenizer's prompt, pooled the same way."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from torch import nn

from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import Manifest, ParityCase, ParityReport, VisionLanguage
from toolkit.vision_families import load_half

__all__ = ["THRESHOLDS", "References", "as_input", "parity_references", "probe_set", "probe_vectors",
           "vision_language_parity"]

THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}  # the text models' gates (min cosine), vs transformers


def _probe_items() -> dict[str, dict]:
    """Items of every kind the runtime takes: text only (with and without an instruction), one image of each
    awkward kind (wide, tall, tiny, RGBA, grayscale, palette, JPEG), text + image, and two images with text."""
    from toolkit.export.towers import probe_images

    images = probe_images()
    items: dict[str, dict] = {
        "text": {"text": "A cat sits on the warm windowsill in the afternoon sun."},
        "text+instruction": {"text": "where do cats sleep?", "instruction": "Find an image that matches the text."},
    }
    for name, data in images.items():
        items[f"image:{name}"] = {"images": [data]}
    items["text+image"] = {"text": "a chart of the results", "images": [images["wide.png"]]}
    items["text+2 images"] = {"text": "compare these", "images": [images["tall.png"], images["photo.jpg"]]}
    return items


def _probe_videos() -> dict[str, dict]:
    """Qwen3-VL's video items: 5 frames (an odd count: the last repeated into the final pair) of a moving
    gradient, alone, with text, and with text and an image; frames taken at 2 per second."""
    from PIL import Image

    from toolkit.export.towers import probe_images

    y, x = np.mgrid[0:45, 0:70]
    frames = []
    for k in range(5):
        rgb = np.stack([(x * 3 + k * 20) % 256, (y * 5 + k * 9) % 256, ((x + y) * 2 + k * 31) % 256], -1)
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
        frames.append(buf.getvalue())
    video = {"frames": frames, "fps": 2.0}
    return {"video": {"videos": [video]}, "text+video": {"text": "what happens in the clip", "videos": [video]},
            "text+video+image": {"text": "the clip and a photo", "videos": [video],
                                 "images": [probe_images()["photo.jpg"]]}}


def probe_set(manifest: Manifest) -> tuple[dict[str, dict], str | None]:
    """(the probe items an artifact of this kind takes, each with its instruction; the card's default instruction,
    which the runtime applies unasked): every item kind, videos where the model reads them, and only the kinds of
    item the card prompts where it has item templates (e5-v: a text alone, an image alone)."""
    from toolkit.runtime.vision_language import item_kind

    spec, card = manifest.vision_language, manifest.card
    items = {**_probe_items(), **(_probe_videos() if spec.video is not None else {})}
    if spec.templates:
        items = {n: item for n, item in items.items()
                 if item_kind(item.get("text"), len(item.get("images", []))) in spec.templates}
    default = card.prompts.get(card.default_prompt_name) if card.default_prompt_name else None
    for item in items.values():
        item.setdefault("instruction", default or None)
    return items, default or None


def as_input(item: dict):
    """A probe item as the runtime's ``Multimodal``."""
    from toolkit.runtime.video import Video
    from toolkit.runtime.vision_language import Multimodal

    return Multimodal(text=item.get("text"), images=item.get("images", []),
                      videos=[Video(v["frames"], fps=v["fps"]) for v in item.get("videos", [])])


def probe_vectors(emb) -> np.ndarray:
    """The artifact's unit vectors of ``probe_set``'s items, in its order (one call per instruction)."""
    items, _ = probe_set(emb.manifest)
    names = list(items)
    out = np.zeros((len(names), emb.manifest.embedding_dim), dtype=np.float64)
    for instruction in dict.fromkeys(item["instruction"] for item in items.values()):
        rows = [i for i, n in enumerate(names) if items[n]["instruction"] == instruction]
        out[rows] = emb.embed([as_input(items[names[i]]) for i in rows], prompt=instruction)
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def _reference(model: nn.Module, resolved: ResolvedModel, spec: VisionLanguage, tokenizer, processor, item: dict) -> np.ndarray:
    """The model's own embedding of one item: its family's forward (the export half's ``run_reference``), the last
    token's state, normalized."""
    hidden = load_half(spec.family, "export").run_reference(model, spec, tokenizer, processor, item)
    last = hidden[0, -1].numpy().astype(np.float64)
    return last / max(np.linalg.norm(last), 1e-12)


def _processor(resolved: ResolvedModel, spec: VisionLanguage, tokenizer):
    """transformers' processor for the reference: the family's own (the export half's ``load_processor``)."""
    return load_half(spec.family, "export").load_processor(resolved, spec, tokenizer)


@dataclass(frozen=True)
class References:
    """The model's own unit vectors of the probe items (``probe_set``), in its order, and what produced them."""

    items: dict[str, dict]
    default: str | None
    vectors: np.ndarray
    source: str


def parity_references(manifest: Manifest, resolved: ResolvedModel, model: nn.Module) -> References:
    """transformers' embedding of every probe item (``_reference``): computed before the artifact is opened, so
    that PyTorch's copy of the model can be released first (a 2B model: 8.8 GB)."""
    from transformers import AutoTokenizer

    spec = manifest.vision_language
    tokenizer = AutoTokenizer.from_pretrained(resolved.transformer_dir)
    processor = _processor(resolved, spec, tokenizer)
    items, default = probe_set(manifest)
    vectors = np.stack([_reference(model, resolved, spec, tokenizer, processor, item) for item in items.values()])
    source = (f"transformers ({type(model).__name__} + its image processor + "
              f"{'the card prompts' if spec.templates else 'its chat template'}, last token)")
    return References(items, default, vectors, source)


def vision_language_parity(emb, references: References, precision: str) -> ParityReport:
    """The artifact's embeddings of every probe item, all in one batch, in batches of 4 (mixed kinds and image
    sizes) and one at a time, vs the model's own (``parity_references``)."""
    from toolkit.runtime.pooling import cosines

    items, default, reference = references.items, references.default, references.vectors
    names = list(items)
    inputs = {n: as_input(items[n]) for n in names}
    cases, worst = [], 1.0
    batches = [("batch of all", names)] + [(f"batch of 4 from {names[i]}", names[i:i + 4]) for i in range(0, len(names), 4)]
    batches += [(n, [n]) for n in names]
    for label, group in batches:
        rows = [names.index(n) for n in group]
        instruction = {items[n]["instruction"] for n in group}
        if len(instruction) > 1:  # one instruction per call: the instructed item runs on its own
            group = [n for n in group if items[n]["instruction"] == default]
            rows = [names.index(n) for n in group]
        (prompt,) = instruction if len(instruction) == 1 else (default,)
        got = emb.embed([inputs[n] for n in group], prompt=prompt)
        cos = cosines(got, reference[rows])
        worst = min(worst, float(cos.min()))
        cases.append(ParityCase(output=f"sentence_embedding ({label})", batch=len(group), seq_len=0, padded=len(group) > 1,
                                padding_side=emb.padding.value, min_cosine=float(cos.min()),
                                max_abs_diff=float(np.abs(got - reference[rows]).max())))
    threshold = THRESHOLDS.get(precision, 0.999)
    return ParityReport(reference=references.source, threshold=threshold, min_cosine={"sentence_embedding": worst},
                        cases=cases, passed=worst >= threshold)
