"""Vision-language embedders at serving time (Qwen2-VL: GME, DSE), without torch: one encoder for texts, images and
items that hold both.

An item becomes model inputs here (``VisionLanguageEncoder.build``): its images decoded and preprocessed as
transformers' image processor does (``runtime.qwen_vl``), the prompt rendered with the model's own chat template
(the instruction, a card prompt, as the system message or, as DSE, before the text; one image part per image, or the card's placeholder image, then the text), the card's
suffix appended, each image placeholder expanded to one token per feature row, and the M-RoPE positions computed.
``run`` takes a batch: the vision graph once per image, then the language graph over the padded batch with the
feature rows in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.cards import PaddingSide
from toolkit.errors import ConfigError, RequestError
from toolkit.manifest import MANIFEST_KEY, decode_manifest
from toolkit.runtime.artifact import image_tower_path
from toolkit.runtime.images import ImageRef, Pixels, decode_image, is_image_input, require_pillow
from toolkit.runtime.outputs import plan_output
from toolkit.runtime.session import LoadedAdapter, OrtSession, refuse_adapter
from toolkit.runtime.video import Video, VideoRef, expand_videos, prepare_video
from toolkit.vision_families import FamilyView

if TYPE_CHECKING:
    from toolkit.runtime.context import ModelContext
    from toolkit.runtime.outputs import OutputPlan

__all__ = ["Chat", "Multimodal", "VisionInput", "VisionLanguageEncoder", "item_kind", "item_messages", "placeholder_images",
           "template_prompt"]


def item_messages(text: str | None, images: int, instruction: str | None, spec, videos: int = 0) -> list[dict]:
    """The chat one item is rendered from, laid out as the model's authors do: ``videos`` video parts, ``images``
    image parts, then the text (Qwen3-VL-Embedding's order). The instruction is the system message (GME,
    Qwen3-VL), or, where the card puts it in the text (``instruction_at = "text"``: DSE's "Query: "), it starts the
    user's text; an item with only images takes the card's ``image_only_text`` (DSE: "What is shown in this
    image?"). ``spec``: the manifest's vision_language."""
    if spec.instruction_at == "text":
        text, instruction = (instruction or "") + (text or spec.image_only_text), None
    elif not text:
        text = spec.image_only_text
    content = [{"type": "video"} for _ in range(videos)] + [{"type": "image"} for _ in range(images)]
    content += [{"type": "text", "text": text}] if text else []
    return ([{"role": "system", "content": instruction}] if instruction else []) + [{"role": "user", "content": content}]


def item_kind(text: str | None, images: int) -> str:
    """The kind of an item, as the card's ``item_templates`` key it: ``text``, ``image`` or ``multimodal``."""
    return "multimodal" if text and images else "image" if images else "text"


def template_prompt(text: str | None, images: int, instruction: str | None, spec, index: int = 0) -> str:
    """An item's prompt from the card's template for its kind (``text``, ``image`` or ``multimodal``; e5-v:
    "<image>\\nSummary above image in one word: " in Llama 3's turn), ``{text}`` its text after the instruction,
    ``{image}`` one image token per image; RequestError for a kind the card has no template for."""
    kind = item_kind(text, images)
    template = spec.templates.get(kind)
    if template is None:
        kinds = {"text": "text-only", "image": "image-only", "multimodal": "text + image"}
        raise RequestError(f"input[{index}] is a {kinds[kind]} item; this model embeds "
                           f"{' and '.join(kinds[k] for k in spec.templates)} items only (its card's prompts)",
                           param="input")
    return template.replace("{text}", (instruction or "") + (text or "")).replace("{image}", spec.image_token * images)


def placeholder_images(spec) -> list:
    """What stands in an item without images: a black square of the card's side (DSE reads every query with one,
    56 x 56, as vLLM's test and the model card's qwen_vl_utils resize give it), or nothing."""
    if not spec.placeholder_image:
        return []
    from PIL import Image

    return [Image.new("RGB", (spec.placeholder_image, spec.placeholder_image))]


class Multimodal:
    """One item holding a text and images together (an image with its caption or instruction, an interleaved
    query): what a vision-language artifact embeds as ONE vector. ``images``: PIL images, bytes, paths, data URIs
    or ``ImageRef``; ``videos`` (Qwen3-VL): ``runtime.video.Video`` or ``VideoRef``."""

    __slots__ = ("images", "text", "videos")
    modality = "multimodal"

    def __init__(self, text: str | None = None, images: Sequence = (), videos: Sequence = ()) -> None:
        self.text = text
        self.images = list(images)
        self.videos = list(videos)

    def __repr__(self) -> str:
        videos = f", videos={len(self.videos)}" if self.videos else ""
        return f"Multimodal(text={self.text!r}, images={len(self.images)}{videos})"


class Chat(Multimodal):
    """A chat request's conversation, rendered as the request says (vLLM's chat embeddings): ``messages`` as the
    chat template reads them (roles and the caller's own system message kept; each image or video content part
    ``{"type": "image"}`` / ``{"type": "video"}``, its source in ``images`` / ``videos`` in order, videos first), the
    model's chat template or the request's, and the request's ``add_generation_prompt``, ``continue_final_message``
    and ``chat_template_kwargs``; no card instruction, no card suffix (those belong to plain items)."""

    __slots__ = ("add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message",
                 "messages")

    def __init__(self, messages: list[dict], images: Sequence = (), videos: Sequence = (), *,
                 add_generation_prompt: bool = False, continue_final_message: bool = False,
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None) -> None:
        texts = [part["text"] for m in messages for part in
                 (m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])
                 if part.get("type") == "text"]
        super().__init__(" ".join(texts) or None, images, videos)
        self.messages = messages
        self.add_generation_prompt, self.continue_final_message = add_generation_prompt, continue_final_message
        self.chat_template, self.chat_template_kwargs = chat_template, chat_template_kwargs

    def __repr__(self) -> str:
        return f"Chat(messages={len(self.messages)}, images={len(self.images)}, videos={len(self.videos)})"


class VisionInput:
    """One item's model inputs: token ids (placeholders expanded), their positions (M-RoPE's three axes, or one),
    each image's vision-graph feeds; ``images``: each image as it came (``Pixels`` without pixels: its placeholder
    tokens, size and format), for usage counts and Cohere's image metadata."""

    __slots__ = ("feeds", "ids", "images", "positions")

    def __init__(self, ids: list[int], positions: np.ndarray, feeds: list[dict[str, np.ndarray]],
                 images: list[Pixels] | None = None) -> None:
        self.ids, self.positions, self.feeds = ids, positions, feeds
        self.images = images or []

    def __len__(self) -> int:  # the batcher's budget: the prompt's tokens
        return len(self.ids)


MAX_VIDEOS = 4  # videos per item

# each family's image side: its preprocessing, the vision graph's feeds, its feature rows and the prompt's positions
FAMILIES = FamilyView("runtime", "Images")  # family -> its runtime half's Images (toolkit.vision_families)


class VisionLanguageEncoder:
    """Texts, images and ``Multimodal`` items of a vision-language artifact, through its two graphs."""

    modality = "multimodal"
    builds_inputs = True  # each item's prompt rendered around its images (``model_inputs``)

    @staticmethod
    def accepts(item) -> bool:
        return isinstance(item, Multimodal)

    def __init__(self, ctx: ModelContext, path: Path) -> None:
        spec = ctx.manifest.vision_language
        if spec is None:
            raise ConfigError(f"{path}: its head is vision-language but its manifest has no vision_language facts")
        if not ctx.manifest.chat_template and not spec.templates:
            raise ConfigError(f"{path}: a vision-language artifact needs the model's chat template or its card's "
                              "item templates; it has neither")
        if spec.family not in FAMILIES:
            raise ConfigError(f"{path}: vision-language family '{spec.family}' is not one of: {', '.join(FAMILIES)} "
                              "(an artifact from a newer toolkit?)")
        vision_path = image_tower_path(path)
        if not vision_path.is_file():
            raise ConfigError(f"{path}: its vision graph {vision_path.name} is not beside it (an export writes both "
                              "files; keep them together)")
        self.session = OrtSession(vision_path, ctx.options)
        own = decode_manifest(self.session.metadata.get(MANIFEST_KEY, "{}"), source=str(vision_path))
        if own.tower != "image" or own.card != ctx.manifest.card:
            raise ConfigError(f"{vision_path}: not the vision graph of {path.name} (its manifest differs)")
        self.ctx, self.spec, self.family = ctx, spec, FAMILIES[spec.family](spec)
        self.outputs = ("sentence_embedding", "sentence_embedding_raw")

    # ---------------------------------------------------------------- inputs
    def item(self, value, index: int) -> Multimodal:
        """Any accepted input as a ``Multimodal`` item: a text, an image, or one already."""
        if isinstance(value, Multimodal):
            item = value
        elif isinstance(value, (Video, VideoRef)):
            item = Multimodal(videos=[value])
        elif isinstance(value, ImageRef) or (not isinstance(value, str) and is_image_input(value)):
            item = Multimodal(images=[value])
        elif isinstance(value, str):
            item = Multimodal(text=value)
        else:
            raise RequestError(f"input[{index}]: a vision-language model takes texts, images or text + images items, "
                               f"got {type(value).__name__}", param="input")
        if not item.images and not item.text and not item.videos:
            raise RequestError(f"input[{index}] has no content", param="input")
        if item.videos and self.spec.video is None:
            raise RequestError(f"input[{index}] has a video: this model reads texts and images only (videos: "
                               "Qwen3-VL artifacts)", param="input")
        if len(item.videos) > MAX_VIDEOS:
            raise RequestError(f"input[{index}] has {len(item.videos)} videos; an item takes at most {MAX_VIDEOS}",
                               param="input")
        if len(item.images) > self.spec.max_images:
            raise RequestError(f"input[{index}] has {len(item.images)} images; this model takes at most "
                               f"{self.spec.max_images} per item", param="input")
        return item

    def build(self, item: Multimodal, instruction: str, index: int, limit: int) -> VisionInput:
        """One item's model inputs (see the module docstring): a plain item's prompt by the card's convention, a
        ``Chat`` rendered as its request says; RequestError past ``limit`` tokens."""
        from toolkit.runtime.chat import render_chat

        feeds, rows, grids, stand_ins = [], [], [], []
        spec = self.spec
        if item.images or item.videos or spec.placeholder_image:
            require_pillow()
        for video in item.videos:  # in the prompt before the images (item_messages' order)
            pair_feeds, pair_rows, pair_grids, text = prepare_video(video, spec, self.family, index)
            feeds += pair_feeds
            rows += pair_rows
            grids += pair_grids
            stand_ins.append(text)
        first_image = len(rows)
        decoded = [decode_image(source.source if isinstance(source, ImageRef) else source, index)
                   for source in item.images]
        for image in decoded or ([] if item.videos else placeholder_images(spec)):
            feed, count, grid = self.family.prepare(image, index)
            feeds.append(feed)
            rows.append(count)
            grids.append(grid)
        seen = [(image.width, image.height, (image.format or "").lower()) for image in decoded]
        ctx = self.ctx
        images = len(rows) - first_image
        if isinstance(item, Chat):  # the request's conversation, rendered as it says
            prompt = ctx.render_chat(item.messages, chat_template=item.chat_template, keep_parts=True,
                                     add_generation_prompt=item.add_generation_prompt,
                                     continue_final_message=item.continue_final_message,
                                     chat_template_kwargs=item.chat_template_kwargs)
            ids = ctx.tokenizer.ids(expand_videos(prompt, stand_ins, spec.video, index), add_special_tokens=False)
        elif spec.templates:  # the card's prompt per kind of item (e5-v), tokenized with the tokenizer's own specials
            ids = ctx.tokenizer.ids(template_prompt(item.text, images, instruction, spec, index),
                                    add_special_tokens=spec.template_specials)
        else:
            messages = item_messages(item.text, images, instruction, spec, videos=len(stand_ins))
            prompt = render_chat(ctx.manifest.chat_template, messages, special_tokens=ctx.manifest.special_tokens,
                                 add_generation_prompt=True, keep_parts=True) + spec.prompt_suffix
            ids = ctx.tokenizer.ids(expand_videos(prompt, stand_ins, spec.video, index), add_special_tokens=False)
        token = spec.image_token_id
        if ids.count(token) != images:
            raise RequestError(f"input[{index}]: the prompt holds {ids.count(token)} image placeholders for "
                               f"{images} images (the text may not contain the image token itself)", param="input")
        expanded: list[int] = []
        counts = iter(rows[first_image:])
        for t in ids:
            expanded.extend([token] * next(counts) if t == token else [t])
        video = spec.video.token_id if spec.video else token
        if spec.video and expanded.count(video) != sum(rows[:first_image]):  # a video token typed in the text
            raise RequestError(f"input[{index}]: the prompt holds {expanded.count(video)} video placeholders for "
                               f"{sum(rows[:first_image])} video features (the text may not contain the video token)",
                               param="input")
        if len(expanded) > limit:
            raise RequestError(f"input[{index}] takes {len(expanded)} tokens (its images {sum(rows)}); this model "
                               f"reads at most {limit}", param="input")
        if spec.sequential_positions:  # ColQwen2 as transformers runs it: 0, 1, 2, ... on every axis
            positions = self.family.positions([False] * len(expanded), [])  # a text's positions
        else:
            positions = self.family.positions([t == token or t == video for t in expanded], grids)
        expanded = [token if t == video else t for t in expanded]  # the language graph places rows at image tokens
        images = [Pixels(None, n, w, h, fmt) for n, (w, h, fmt) in zip(rows, seen)]  # the caller's, not a placeholder
        return VisionInput(expanded, positions, feeds, images)

    def model_inputs(self, inputs, *, dimensions: int | None = None, normalize: bool | None = None,
                     prompt_name: str | None = None, prompt: str | None = None, truncate_prompt_tokens=None,
                     any_size: bool = False, **ignored) -> tuple[list[VisionInput], OutputPlan]:
        """The embedding task's model inputs for any mix of texts, images and ``Multimodal`` items (one vector
        each) and the output plan; ``prompt`` / ``prompt_name`` choose the instruction (the system message).
        Items are not cut: one longer than the model's window is a RequestError, and so is a truncation
        length (cutting a prompt could split an image's tokens)."""
        ctx = self.ctx
        listed = [inputs] if isinstance(inputs, (str, Multimodal, ImageRef)) else list(inputs)
        if not listed:
            raise RequestError("input must not be empty", param="input")
        if isinstance(truncate_prompt_tokens, int) and not isinstance(truncate_prompt_tokens, bool) \
                and truncate_prompt_tokens > 0:
            raise RequestError("truncate_prompt_tokens is not supported for vision-language models: an item longer "
                               f"than the model's {ctx.manifest.max_seq_len} tokens is refused", param="truncate_prompt_tokens")
        plan = plan_output(ctx, dimensions, normalize, any_size=any_size)
        instruction = ctx.prompt_text(prompt_name, prompt)
        limit = ctx.manifest.max_seq_len
        return [self.build(self.item(x, i), instruction, i, limit) for i, x in enumerate(listed)], plan

    def multi_vector_inputs(self, inputs, *, prompt: str | None = None,
                            truncate_prompt_tokens: int | None = None) -> list[VisionInput]:
        """A ColVision artifact's model inputs (``export.colvision``): each text or image rendered by the
        processor's own template for its kind (a text as a query, an image as a page), whatever the mode."""
        listed = [inputs] if isinstance(inputs, (str, Multimodal, ImageRef)) or is_image_input(inputs) \
            else list(inputs)
        if not listed:
            raise RequestError("input must not be empty", param="input")
        if prompt is not None:
            raise RequestError("this model's prompts are its processor's (a query prefix for texts, a page prompt "
                               "for images); a prompt cannot replace them", param="prompt")
        if isinstance(truncate_prompt_tokens, int) and not isinstance(truncate_prompt_tokens, bool) \
                and truncate_prompt_tokens > 0:
            raise RequestError("truncate_prompt_tokens is not supported for vision-language models: an item longer "
                               f"than the model's {self.ctx.manifest.max_seq_len} tokens is refused",
                               param="truncate_prompt_tokens")
        limit = self.ctx.manifest.max_seq_len
        return [self.build(self.item(x, i), None, i, limit) for i, x in enumerate(listed)]

    # ---------------------------------------------------------------- graphs
    def run(self, items: Sequence, outputs: Sequence[str], adapter: LoadedAdapter | None = None) -> list[np.ndarray]:
        """A batch of ``VisionInput`` (or bare token ids, ``Tokenized``: a text prompt as given, as /ready's probe
        sends) through the vision graph per image, then the language graph."""
        refuse_adapter(adapter, "vision-language graph")
        ctx = self.ctx
        items = [item if isinstance(item, VisionInput) else
                 VisionInput(list(item.ids), self.family.positions([False] * len(item), []), []) for item in items]
        spec = self.spec
        runs = [self.session.run(list(self.family.outputs), feeds) for item in items for feeds in item.feeds]
        embeds = np.concatenate([r[0] for r in runs]) if runs else np.zeros((1, spec.hidden_size), np.float32)
        seq = max(len(item) for item in items)
        ids = np.full((len(items), seq), ctx.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(items), seq), dtype=np.int64)
        positions = np.zeros((items[0].positions.shape[0], len(items), seq), dtype=np.int64)
        for row, item in enumerate(items):
            n = len(item)
            cols = slice(0, n) if ctx.padding == PaddingSide.RIGHT else slice(seq - n, seq)
            ids[row, cols], mask[row, cols], positions[:, row, cols] = item.ids, 1, item.positions
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 "image_embeds": embeds.astype(np.float32, copy=False)}
        if spec.deepstack:  # one unused row per layer when no item has an image, as image_embeds
            feeds["deepstack_embeds"] = np.concatenate([r[1] for r in runs], axis=1) if runs else \
                np.zeros((spec.deepstack, 1, spec.hidden_size), np.float32)
        return ctx.session.run(outputs, feeds)
