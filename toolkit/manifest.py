"""The artifact manifest: everything the runtime needs, stored in the ONNX file.

The manifest is JSON under the ``metadata_props`` key ``toolkit.manifest``;
the tokenizer (``tokenizer.json``) and the model card text sit beside it
under ``toolkit.tokenizer`` and ``toolkit.model_card``. Decoding is strict.
"""

from __future__ import annotations

import msgspec

from toolkit.cards import ModelCard, Pooling
from toolkit.errors import ConfigError

__all__ = [
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "MODEL_CARD_KEY",
    "TOKENIZER_KEY",
    "AdapterSpec",
    "ImagePreprocess",
    "ImageTower",
    "LateInteraction",
    "Manifest",
    "VideoFacts",
    "VisionLanguage",
    "ParityCase",
    "ParityReport",
    "decode_manifest",
    "encode_manifest",
]

MANIFEST_KEY = "toolkit.manifest"
TOKENIZER_KEY = "toolkit.tokenizer"
MODEL_CARD_KEY = "toolkit.model_card"
# 2: the head (what the artifact is and the tasks it answers) is recorded; 3: the head declares each modality's
# encoder (and a late-interaction artifact its modes): a reader of format 2 would refuse the new keys, so the
# version says "upgrade" first (``decode_manifest`` reads the version before anything else); 4: the LoRA adapters
# an artifact carries
MANIFEST_VERSION = 4


class ParityCase(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One parity probe: a batch shape compared against the reference."""

    output: str
    batch: int
    seq_len: int
    padded: bool
    padding_side: str
    min_cosine: float
    max_abs_diff: float


class ParityReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the export's verification measured; ``skipped`` marks an unverified artifact."""

    reference: str  # "sentence-transformers" | "torch"
    threshold: float
    min_cosine: dict[str, float] = {}
    max_abs_diff: dict[str, float] = {}  # cross-encoders: logits vs torch, scores vs CrossEncoder.predict
    cases: list[ParityCase] = []
    retrieval_top10_overlap: float | None = None
    vs_fp32_min_cosine: float | None = None
    # outputs that missed the cosine threshold (fp32): [artifact's, torch fp32's] max (1 - cos) vs float64
    noise_floor: dict[str, list[float]] = {}
    skipped: bool = False
    passed: bool = True


class ImagePreprocess(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How an image becomes the image tower's ``pixel_values`` (from the model's ``preprocessor_config.json``),
    in this order: EXIF orientation applied, RGB (transparency composited on white), resize, center crop,
    ``x * rescale_factor``, ``(x - mean) / std``, channels first."""

    exif_transpose: bool = True  # as transformers' load_image (and every image viewer) does
    convert_rgb: bool = True
    resize: str = "shortest_edge"  # "shortest_edge" (aspect ratio kept, the long side int()-rounded) | "fixed" | "none"
    size: list[int] = []  # shortest_edge: [edge]; fixed: [height, width]
    resample: str = "bicubic"  # Pillow's filter: nearest | box | bilinear | hamming | bicubic | lanczos
    center_crop: list[int] | None = None  # [height, width]; an image smaller than it is padded with zeros
    rescale_factor: float | None = 1 / 255
    mean: list[float] | None = None  # None: not normalized
    std: list[float] | None = None
    height: int  # the graph's input size
    width: int


class ImageTower(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The image tower: a second graph beside the text artifact (``<name>.image.onnx``), same embedding space."""

    input: str = "pixel_values"  # float32 (batch, 3, height, width)
    outputs: list[str] = msgspec.field(default_factory=lambda: ["image_embedding", "image_embedding_raw"])  # normalized as the card says; projection only
    embedding_dim: int
    tokens: int  # positions the tower reads per image (patches, plus a class token where it has one)
    preprocess: ImagePreprocess
    parity: ParityReport


class VideoFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Qwen3-VL's video side (``video_preprocessor_config.json``, the card's overrides): how frames are sampled
    and sized, and the prompt's tokens. Each pair of frames runs through the vision graph as one image does."""

    token: str  # <|video_pad|>: one per feature row of a frame pair
    token_id: int
    vision_start: str  # <|vision_start|> / <|vision_end|>: around each frame pair, after its timestamp
    vision_end: str
    fps: float  # a video file is sampled at this many frames per second (transformers' sample_frames)
    min_frames: int
    max_frames: int
    min_pixels: int  # bounds on the pixels of ALL sampled frames together (transformers' smart_resize)
    max_pixels: int
    frame_cap: int = 0  # cap_pixels_per_frame: at most this many pixels per frame (0: no cap)
    mean: list[float]
    std: list[float]


class VisionLanguage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A vision-language embedder (Qwen2-VL: GME, DSE): the vision graph beside the artifact (``<name>.image.onnx``,
    one image per run: patches -> features) and what the runtime needs to build its prompts and positions. The
    artifact itself is the language graph: token ids, the image features where the prompt's image tokens are,
    and the multimodal rotary positions."""

    family: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl | qwen3_vl | llava_next
    window_size: int = 0  # Qwen2.5-VL: the tower's attention window (pixels); 0: every block attends the whole image
    position_grid: int = 0  # Qwen3-VL: the side of the tower's learned position table (resampled per image); 0: none
    deepstack: int = 0  # Qwen3-VL: feature rows from this many tower layers added to the first language layers
    image_token: str  # the placeholder the chat template writes once per image, expanded to one per feature row
    image_token_id: int
    prompt_suffix: str = ""  # text after the rendered template (GME and DSE end with <|endoftext|>, pooled last)
    instruction_at: str = "system"  # the instruction is the system message, or "text": before the item's text
    image_only_text: str = ""  # the text of an item that has only images (DSE: "What is shown in this image?")
    placeholder_image: int = 0  # a black square of this side stands in an item without images (DSE: 56)
    templates: dict[str, str] = {}  # the card's prompt per kind of item (text, image, multimodal), not a chat (e5-v)
    # the templates are tokenized with the tokenizer's own special tokens added (e5-v's <|begin_of_text|>); False:
    # as written (a ColVision processor writes its own, ColPali's <bos>)
    template_specials: bool = True
    crop_size: int = 0  # LLaVA-NeXT: the tower's input side; each image is viewed whole and tiled at one of
    grid_pinpoints: list[list[int]] = []  # these (height, width) resolutions
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: list[float]
    std: list[float]
    resample: str = "bicubic"
    max_images: int = 8  # images per item
    # every token (an image's too) at its index on all position axes, as transformers' ColQwen2ForRetrieval reads
    # a prompt (it passes no positions to its Qwen2-VL model, which counts 0, 1, 2, ...); else the family's own
    sequential_positions: bool = False
    hidden_size: int  # width of the vision graph's output rows (the language model's)
    video: VideoFacts | None = None  # Qwen3-VL: videos (frame lists, and files with the [video] extra)
    parity: ParityReport


class LateInteraction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A late-interaction (ColBERT) artifact's modes, as the checkpoint's sentence-transformers files declare them
    (``MultiVectorEncoder``: its Transformer's lengths and query expansion, its MultiVectorMask's skiplist): how a
    query and a document are tokenized, which positions' vectors are kept, and how a pair is scored (MaxSim)."""

    prompts: dict[str, str]  # mode ("query" | "document") -> the text prepended ("[unused0] ", "[Q] ")
    query_length: int | None = None  # cap on a query's tokens, specials included (None: the model's window)
    document_length: int | None = None  # cap on a document's tokens (None: the model's window)
    expansion: str | None = None  # queries padded with expansion_id up to expansion_length: "fixed" (cut there
    # too) | "min" (only padded) | None (no expansion)
    expansion_length: int = 0
    expansion_id: int = -1  # [MASK]: its vectors are kept and scored
    attend_expansion: bool = False  # the encoder attends to the expansion positions (else attention mask 0)
    skiplist_ids: list[int] = []  # token ids whose vectors are dropped (punctuation) in the skiplist modes
    skiplist_modes: list[str] = msgspec.field(default_factory=lambda: ["document"])
    similarity: str = "maxsim"  # "maxsim" | "meanmaxsim" (divided by the query's token count)


class AdapterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A LoRA adapter the artifact carries: its parameters in ``<artifact stem>.adapter.<name>.onnx_adapter``
    beside it (``toolkit.runtime.artifact.adapter_path``), verified at export against PEFT's own model."""

    name: str
    rank: int  # the largest r over the modules it adapts
    alpha: float
    targets: list[str]  # the modules it adapts (names in the exported module)
    parameters: int  # its own numbers (the base's are not repeated)
    source: str = ""  # the PEFT folder it was read from
    min_cosine: dict[str, float] = {}  # per output, against PEFT's model with this adapter active
    passed: bool = False


class HeadSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the artifact IS, written by the exporter from its head (``export.heads``): the runtime reads this and
    never infers a kind from output names."""

    name: str  # dense | m3 | sparse | classifier | towers
    label: str  # in words, for messages: "dense embedding", "cross-encoder (reranker)", ...
    tasks: list[str]  # the task table's entries it answers (``toolkit.runtime.tasks``)
    token_output: str | None = None  # the graph output ``token_embed`` reads (per-token vectors)
    token_offset: int = 0  # leading positions ``token_embed`` drops (BGE-M3's ColBERT: the CLS token, as FlagEmbedding)
    pairs: bool = False  # it scores (query, document) pairs (a cross-encoder) instead of embedding each side
    modalities: list[str] = msgspec.field(default_factory=lambda: ["text"])
    # the encoder that reads each modality (the runtime's ``toolkit.runtime.encoders.ENCODERS``): "text", "image",
    # "vision_language" (one encoder for texts, images, items with both, and videos); {} in artifacts written
    # before it was recorded (``Manifest.encoders`` tells those as that toolkit did)
    encoders: dict[str, str] = {}
    late_interaction: LateInteraction | None = None  # a multi-vector (ColBERT) artifact: its modes and scoring


def legacy_head(outputs: list[str], card: ModelCard, image: bool) -> HeadSpec:
    """The head of an artifact written before format 2 (which did not record it), told from its outputs and card
    as that toolkit did: the one place a kind is inferred, and only for such artifacts."""
    head = _legacy_kind(outputs, card, image)
    return msgspec.structs.replace(head, encoders={modality: modality for modality in head.modalities})


def _legacy_kind(outputs: list[str], card: ModelCard, image: bool) -> HeadSpec:
    if card.pooling == Pooling.RANK:
        return HeadSpec(name="classifier", label="cross-encoder (reranker)", tasks=["score", "classify"], pairs=True)
    if image:
        return HeadSpec(name="towers", label="two-tower (text + image)", tasks=["embed", "score"],
                        modalities=["text", "image"])
    if "sparse_embedding" in outputs and "sentence_embedding" in outputs:
        return HeadSpec(name="m3", label="dense + sparse + multi-vector (BGE-M3)",
                        tasks=["embed", "token_embed", "score", "embed_sparse"], token_output="colbert_embeddings",
                        token_offset=1)
    if "sparse_embedding" in outputs:
        return HeadSpec(name="sparse", label="sparse (SPLADE)", tasks=["embed_sparse"])
    return HeadSpec(name="dense", label="dense embedding", tasks=["embed", "token_embed", "score"],
                    token_output="token_embeddings")


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The versioned description of one artifact."""

    format_version: int = MANIFEST_VERSION
    card: ModelCard
    model_type: str
    inputs: list[str]
    outputs: list[str]
    embedding_dim: int
    hidden_size: int
    vocab_size: int
    max_seq_len: int
    pad_token_id: int
    special_tokens: dict[str, str] = {}
    chat_template: str | None = None  # the tokenizer's Jinja chat template, when it has one
    precision: str = "fp32"
    target: str = "cpu"
    opset: int = 18
    export_options: dict[str, bool | int | float | str | list[int] | None] = {}
    versions: dict[str, str] = {}
    fused_ops: dict[str, int] = {}
    # *_ms timings are numbers; int8_forms: per int8 form searched, its facts
    optimization: dict[str, float | int | str | dict[str, dict[str, float | int | str]]] = {}
    quantization_range: list[float] | None = None  # [lo, hi] of native unit-vector components
    parity: ParityReport
    image: ImageTower | None = None  # two-tower models (CLIP, SigLIP)
    vision_language: VisionLanguage | None = None  # vision-language embedders (Qwen2-VL)
    tower: str = "text"  # which tower this file holds: "text" (the handle) or "image"
    head: HeadSpec | None = None  # None only in format-1 artifacts: see ``head_spec``
    adapters: list[AdapterSpec] = []  # LoRA adapters picked per request (format 4)
    warnings: list[str] = []

    @property
    def head_spec(self) -> HeadSpec:
        """What the artifact is (recorded by the exporter; told from outputs only for format-1 artifacts)."""
        return self.head or legacy_head(self.outputs, self.card, self.image is not None)

    @property
    def encoders(self) -> dict[str, str]:
        """Each modality's encoder, as the exporter recorded it; for artifacts that predate the record, what that
        toolkit opened: the vision-language encoder for every modality (and videos, where the model reads them)
        of a vision-language artifact, else one encoder per modality, named after it."""
        head = self.head_spec
        if head.encoders:
            return dict(head.encoders)
        if self.vision_language is not None:
            video = ["video"] if self.vision_language.video is not None else []
            return {modality: "vision_language" for modality in (*head.modalities, *video)}
        return {modality: modality for modality in head.modalities}

    @property
    def sparse(self) -> bool:
        """It has SPLADE's vocabulary-sized output (alone, or beside BGE-M3's dense one)."""
        return "embed_sparse" in self.head_spec.tasks


def encode_manifest(manifest: Manifest) -> str:
    return msgspec.json.encode(manifest).decode()


class _Version(msgspec.Struct):
    format_version: int = 1


def decode_manifest(text: str, *, source: str = "artifact") -> Manifest:
    """Decode a manifest, refusing newer format versions (checked first: a newer format may hold keys this
    toolkit does not know, and the answer to that is "upgrade") and unknown keys."""
    try:
        version = msgspec.json.decode(text, type=_Version).format_version
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{source}: invalid toolkit manifest: {exc}") from None
    if version > MANIFEST_VERSION:
        raise ConfigError(
            f"{source}: manifest format {version} is newer than this toolkit reads ({MANIFEST_VERSION}); "
            "upgrade onnx-embed-toolkit"
        )
    try:
        return msgspec.json.decode(text, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: invalid toolkit manifest: {exc}") from None
