"""What comes after the encoder: a head, chosen once per export from the card.

A head says which transformers class loads the checkpoint, what the graph computes from the encoder's
output, the graph's output names and embedding dimension, which CPU optimizations apply, and how the
export is verified. The rest of the exporter asks the head and never checks a kind.

- ``DenseHead``: pool (CLS, mean, last token) -> dense layers -> Matryoshka slices -> normalize.
  Outputs ``sentence_embedding``, ``token_embeddings``, ``sentence_embedding_raw``, ``sentence_embedding_<d>``.
- ``M3Head`` (BGE-M3): the dense head plus ``sparse_embedding`` and ``colbert_embeddings`` from its own layers.
- ``SparseHead`` (SPLADE): masked-LM logits -> log1p(relu) -> max over real tokens. Outputs ``sparse_embedding``.
- ``TowerHead`` (CLIP, SigLIP): the text tower's projected features (``get_text_features``), normalized; the
  image tower is a second graph (``export.towers``). Outputs ``sentence_embedding``, ``sentence_embedding_raw``.
- ``ClassifierHead`` (cross-encoders, pooling ``rank``, one label): the sequence-classification logits (batch, 1);
  the activation is recorded in the card and applied by the runtime. Verified on (query, document) pairs by
  max absolute difference, against sentence-transformers' ``CrossEncoder.predict`` where it loads the model.
- ``MultiVectorHead`` (late interaction: ColBERT in sentence-transformers' ``MultiVectorEncoder`` / PyLate layout): the
  Dense projection of every token's state, each vector normalized. Outputs ``colbert_embeddings`` (batch, seq, dim);
  which positions count (a query's [MASK] expansion, a document's skiplist) is declared data for the runtime.
- ``LabelsHead`` (text classifiers: sentiment, NLI, emotion, topic; pooling ``rank``, N labels): the same logits
  (batch, N) with the config's ``id2label`` and the activation transformers' text-classification pipeline applies.
  Verified on single texts against torch (the logits) and the pipeline (the probabilities).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from toolkit.cards import ACTIVATIONS, ModelCard, Pooling
from toolkit.errors import ConfigError
from toolkit.manifest import HeadSpec, LateInteraction

__all__ = ["ClassifierHead", "DenseHead", "Head", "LabelsHead", "M3Head", "MultiVectorHead", "SparseHead", "TowerHead", "VisionLanguageHead",
           "cross_encoder_activation", "head_for", "label_names", "num_labels", "pipeline_activation"]


def normalize(x: torch.Tensor) -> torch.Tensor:
    # x / max(||x||, eps), written out so every exporter produces the same small graph
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)


class Head(ABC):
    """One kind of output computation; stateless (the module holds the weights)."""

    name: str
    auto_class: str  # the transformers Auto class that loads the checkpoint for this head
    optimizable: bool  # onnxruntime's transformer fusions apply
    compact_table: bool  # the CPU word-embedding table may be stored in fp16 (Gather fp16 -> Cast)
    dense_layers: bool  # sentence-transformers Dense modules run after pooling
    calibrated_range: bool  # Cohere int8/uint8 need a calibrated range of unit-vector components
    st_reference: bool  # sentence-transformers' encode() is a reference for parity
    needs_arch: str | None = None  # an ArchSpec flag the architecture must have for this head
    pairs: bool = False  # inputs are (query, document) pairs
    parity_metric: str = "cosine"  # "cosine" (vectors) or "abs" (scores: max absolute difference)
    image_tower: bool = False  # an image tower is exported beside the text graph (export.towers)
    vision_language: bool = False  # a vision graph beside a language graph (export.vision_language)
    modalities: tuple[str, ...] = ("text",)  # what the artifact reads (the runtime opens an encoder for each)
    encoder: str | None = None  # one encoder for every modality (the runtime's ENCODERS name); None: one each
    multi_vector: bool = False  # late interaction: checked against MultiVectorEncoder (export.late_interaction)
    # what the manifest records (toolkit.manifest.HeadSpec): the runtime reads these, never the outputs' names
    label: str
    tasks: tuple[str, ...]  # entries of the runtime's task table (toolkit.runtime.tasks)
    token_output: str | None = None  # the graph output token_embed reads
    token_offset: int = 0  # leading positions token_embed drops

    def spec(self) -> HeadSpec:
        """The manifest's description of this head."""
        return HeadSpec(name=self.name, label=self.label, tasks=list(self.tasks), token_output=self.token_output,
                        token_offset=self.token_offset, pairs=self.pairs, modalities=list(self.modalities),
                        encoders={modality: self.encoder or modality for modality in self.modalities})

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the graph calls as its encoder (the loaded model itself, unless a head says otherwise)."""
        return model

    @abstractmethod
    def outputs(self, card: ModelCard) -> list[str]:
        """The graph's output names, in order."""

    @abstractmethod
    def dim(self, config: dict, dense_out: int | None) -> int:
        """The embedding dimension (``dense_out``: the last dense layer's width, if any)."""

    @abstractmethod
    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        """The encoder's output -> the graph's outputs."""

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        """Card fields this head fixes (``normalize``: the CLI's override, if any; ``config``: config.json)."""
        return fields


class DenseHead(Head):
    name = "dense"
    label = "dense embedding"
    tasks = ("embed", "token_embed", "score")
    token_output = "token_embeddings"
    auto_class = "AutoModel"
    optimizable = True
    compact_table = True  # sentence cosine moves ~1e-7 (MiniLM)
    dense_layers = True
    calibrated_range = True
    st_reference = True

    def outputs(self, card: ModelCard) -> list[str]:
        heads = [f"sentence_embedding_{d}" for d in card.matryoshka_dims]
        return ["sentence_embedding", "token_embeddings", "sentence_embedding_raw", *heads]

    def dim(self, config: dict, dense_out: int | None) -> int:
        return dense_out if dense_out is not None else int(config.get("hidden_size", 0))

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        hidden = out.last_hidden_state  # (batch, seq, hidden)
        raw = dense(pool(card.pooling, hidden, attention_mask))  # (batch, dim)
        final = normalize(raw) if card.normalize else raw
        heads = [normalize(raw[:, :d]) if card.normalize else raw[:, :d] for d in card.matryoshka_dims]
        return (final, hidden, raw, *heads)


class M3Head(DenseHead):
    """BGE-M3's three outputs from one graph (FlagEmbedding's BGEM3FlagModel): the dense head as DenseHead
    (CLS), plus ``sparse_embedding`` (batch, vocab): relu(sparse_linear(hidden)) per token, the max per
    vocabulary id, special tokens dropped; and ``colbert_embeddings`` (batch, seq, dim): colbert_linear(hidden)
    per real token, normalized (the runtime drops the first, CLS, as FlagEmbedding does). The two linear layers
    are read from ``sparse_linear.pt`` / ``colbert_linear.pt`` beside the checkpoint, FlagEmbedding's layout."""

    name = "m3"
    label = "dense + sparse + multi-vector (BGE-M3)"
    tasks = ("embed", "token_embed", "score", "embed_sparse")
    token_output = "colbert_embeddings"  # ColBERT's vectors are its per-token output
    token_offset = 1  # the first (CLS) position is dropped, as FlagEmbedding does
    compact_table = False  # three outputs read the same table; keep the lookup exact
    FILES = ("sparse_linear.pt", "colbert_linear.pt")

    def __init__(self, folder) -> None:
        from pathlib import Path

        self.folder = Path(folder)

    def outputs(self, card: ModelCard) -> list[str]:
        return [*super().outputs(card), "sparse_embedding", "colbert_embeddings"]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.folder)
        unused = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id} - {None}
        layers = []
        for name in self.FILES:
            state = torch.load(self.folder / name, map_location="cpu", weights_only=True)
            out_features, in_features = state["weight"].shape
            layer = torch.nn.Linear(in_features, out_features)
            layer.load_state_dict(state)
            layers.append(layer)
        return M3Encoder(model, *layers, sorted(unused), int(model.config.vocab_size))

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        dense_out, sparse, colbert = out
        return (*super().forward(dense_out, attention_mask, dense, card), sparse, colbert)


class M3Encoder(torch.nn.Module):
    """The encoder plus BGE-M3's sparse and ColBERT layers: (encoder output, sparse (batch, vocab), colbert)."""

    def __init__(self, model: torch.nn.Module, sparse_linear: torch.nn.Linear, colbert_linear: torch.nn.Linear,
                 unused_ids: list[int], vocab_size: int) -> None:
        super().__init__()
        self.model, self.sparse_linear, self.colbert_linear = model, sparse_linear, colbert_linear
        keep = torch.ones(vocab_size)
        keep[unused_ids] = 0.0
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1) * mask  # (batch, seq)
        sparse = torch.zeros(hidden.shape[0], self.keep.shape[0], dtype=hidden.dtype, device=hidden.device)
        sparse = sparse.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True) * self.keep
        colbert = normalize(self.colbert_linear(hidden)) * mask.unsqueeze(-1)
        return out, sparse, colbert

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


class MultiVectorHead(Head):
    """Late interaction (ColBERT): ``normalize(dense(hidden))`` at every position, as sentence-transformers'
    MultiVectorEncoder runs its Transformer, Dense (per token) and Normalize modules. Every position's vector is an
    output: a query's [MASK] expansion positions are read with attention mask 0 and still scored, so the runtime,
    not the graph, keeps the positions the checkpoint scores (``LateInteraction``: the MultiVectorMask's rule)."""

    name = "multi_vector"
    label = "multi-vector (late interaction, ColBERT)"
    tasks = ("token_embed", "score")  # token_embed in query / document mode; score and rerank by MaxSim
    token_output = "colbert_embeddings"
    auto_class = "AutoModel"
    optimizable = True
    compact_table = False  # per-token vectors are checked at 1e-5 against the library: keep the lookup exact
    dense_layers = True  # the per-token Dense to 128
    calibrated_range = False
    st_reference = False  # MultiVectorEncoder is checked by export.late_interaction, not SentenceTransformer
    multi_vector = True

    def __init__(self, late: LateInteraction) -> None:
        self.late = late

    def spec(self) -> HeadSpec:
        import msgspec

        return msgspec.structs.replace(super().spec(), late_interaction=self.late)

    def outputs(self, card: ModelCard) -> list[str]:
        return ["colbert_embeddings"]

    def dim(self, config: dict, dense_out: int | None) -> int:
        return dense_out if dense_out is not None else int(config.get("hidden_size", 0))

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        vectors = dense(out.last_hidden_state)  # (batch, seq, dim)
        return (normalize(vectors) if card.normalize else vectors,)


class SparseHead(Head):
    name = "sparse"
    label = "sparse (SPLADE)"
    tasks = ("embed_sparse",)
    auto_class = "AutoModelForMaskedLM"
    optimizable = False  # no fuser pattern for the masked-LM head
    compact_table = False  # the masked-LM head shares the word-embedding table
    dense_layers = False
    calibrated_range = False
    st_reference = False
    needs_arch = "splade"  # a masked-LM head (BertForMaskedLM and kin)

    def outputs(self, card: ModelCard) -> list[str]:
        return ["sparse_embedding"]

    def dim(self, config: dict, dense_out: int | None) -> int:
        return int(config.get("vocab_size", 0))

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        logits = out.logits  # (batch, seq, vocab)
        weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
        return (weights.amax(dim=1),)

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        return {**fields, "normalize": normalize if normalize is not None else False}


class ClassifierHead(Head):
    name = "classifier"
    label = "cross-encoder (reranker)"
    tasks = ("score", "classify")
    auto_class = "AutoModelForSequenceClassification"
    optimizable = True
    compact_table = False  # it moves a score by ~1e-5 (measured on a MiniLM-shaped reranker): the gate's size
    dense_layers = False
    calibrated_range = False
    st_reference = True  # CrossEncoder.predict
    pairs = True
    parity_metric = "abs"

    def outputs(self, card: ModelCard) -> list[str]:
        return ["logits"]

    def dim(self, config: dict, dense_out: int | None) -> int:
        return num_labels(config)

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        return (out.logits,)  # (batch, num_labels)

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        return {**fields, "normalize": False, "activation": fields.get("activation") or cross_encoder_activation(config),
                "labels": label_names(config)}


class LabelsHead(ClassifierHead):
    name = "labels"
    label = "text classifier"
    tasks = ("classify",)  # per-label probabilities; a pair score needs one label
    st_reference = False  # transformers' text-classification pipeline is the reference (export.parity)
    pairs = False  # single texts (a pair, as TEI's /predict takes it, is read as the model's tokenizer pairs it)

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        return {**fields, "normalize": False, "activation": pipeline_activation(config), "labels": label_names(config)}


class TowerHead(Head):
    name = "towers"
    label = "two-tower (text + image)"
    tasks = ("embed", "score")  # sentence vectors of texts and images; no per-token states
    auto_class = "AutoModel"  # CLIPModel, SiglipModel
    optimizable = False  # no fuser pattern matched by onnxruntime for these towers here
    compact_table = False
    dense_layers = False
    calibrated_range = True
    st_reference = False  # checked against the model's own tokenizer + get_text_features instead
    image_tower = True
    modalities = ("text", "image")

    def outputs(self, card: ModelCard) -> list[str]:
        return ["sentence_embedding", "sentence_embedding_raw"]

    def dim(self, config: dict, dense_out: int | None) -> int:
        text = config.get("text_config") or {}
        return int(config.get("projection_dim") or text.get("projection_size") or text.get("hidden_size") or 0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return TextFeatures(model)

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        return (normalize(out) if card.normalize else out, out)

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        text = config.get("text_config") or {}
        length = int(text.get("max_position_embeddings") or 77)
        fixed = config.get("model_type") == "siglip"  # trained on text padded to its full length
        return {**fields, "normalize": normalize if normalize is not None else True, "pad_to_max_length": fixed,
                "max_seq_len": length if fixed else min(int(fields.get("max_seq_len") or length), length),
                "matryoshka_dims": [],
                "matryoshka_any": False}


class VisionLanguageHead(DenseHead):
    """Vision-language embedders (Qwen2-VL: GME, DSE): the dense head's last-token pooling, Matryoshka slices and
    normalization on the language model's states, over prompts that hold images; exported as two graphs
    (``export.vision_language``), verified against transformers with its own image processor."""

    name = "vision_language"
    label = "vision-language embedding"
    tasks = ("embed", "score")
    token_output = None
    auto_class = "AutoModelForImageTextToText"
    optimizable = False
    compact_table = False
    dense_layers = False
    calibrated_range = False
    st_reference = False
    vision_language = True
    modalities = ("text", "image", "multimodal")  # a text, an image, or both in one item
    encoder = "vision_language"  # all through the same two graphs (videos too, where the family reads them)

    def dim(self, config: dict, dense_out: int | None) -> int:
        return language_width(config)


def language_width(config: dict) -> int:
    """A vision-language model's language width (its states, and the image feature rows placed among them)."""
    return int((config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size") or 0)


class ColVisionHead(VisionLanguageHead):
    """ColVision retrievers (ColQwen2, ColPali): every position's state through the model's ``embedding_proj_layer``
    (the ``dense`` the language graph passes), L2-normalized, zeroed where the attention mask is 0, as
    ``ColQwen2ForRetrieval`` / ``ColPaliForRetrieval`` compute them: late interaction over texts and document
    images (``export.colvision``)."""

    name = "colvision"
    label = "multi-vector vision-language retrieval (ColQwen2, ColPali)"
    tasks = ("token_embed", "score")
    token_output = "colbert_embeddings"
    multi_vector = True
    modalities = ("text", "image")  # a text (a query, as the processor reads it) or an image (a page)

    def __init__(self, late: LateInteraction, width: int) -> None:
        self.late, self.width = late, width

    def spec(self) -> HeadSpec:
        import msgspec

        return msgspec.structs.replace(super().spec(), late_interaction=self.late)

    def outputs(self, card: ModelCard) -> list[str]:
        return ["colbert_embeddings"]

    def dim(self, config: dict, dense_out: int | None) -> int:
        return self.width

    def forward(self, out, attention_mask: torch.Tensor, dense: torch.nn.Module, card: ModelCard) -> tuple:
        vectors = dense(out.last_hidden_state)  # (batch, seq, width)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True)  # the models' own division (no epsilon)
        return (vectors * attention_mask.unsqueeze(-1).to(vectors.dtype),)

    def complete(self, fields: dict, normalize: bool | None, config: dict) -> dict:
        return {**fields, "pooling": None, "normalize": True}


class TextFeatures(torch.nn.Module):
    """A two-tower model's text tower up to its projection: what ``get_text_features`` returns."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


def num_labels(config: dict) -> int:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else int(config.get("num_labels", 1) or 1)


def label_names(config: dict) -> list[str]:
    """Each logit's label, in id order: the config's ``id2label`` (keys are ids, as strings in config.json), else
    transformers' default ``LABEL_i``."""
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return [str(labels[k]) for k in sorted(labels, key=int)]
    return [f"LABEL_{i}" for i in range(num_labels(config))]


def pipeline_activation(config: dict) -> str:
    """What transformers' text-classification pipeline applies by default (vLLM's classify too): nothing for a
    regression, sigmoid for one label or a multi-label problem, softmax otherwise."""
    if config.get("problem_type") == "regression":
        return "identity"
    if num_labels(config) == 1 or config.get("problem_type") == "multi_label_classification":
        return "sigmoid"
    return "softmax"


def cross_encoder_activation(config: dict) -> str:
    """What sentence-transformers' CrossEncoder applies: its saved activation_fn, else sigmoid for one label and
    identity otherwise."""
    saved = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
        "sbert_ce_default_activation_function")
    if isinstance(saved, str):
        name = saved.rsplit(".", 1)[-1].lower()
        if name not in ACTIVATIONS:
            raise ConfigError(f"CrossEncoder activation '{saved}' is not one of: {', '.join(ACTIVATIONS)}")
        return name
    return "sigmoid" if num_labels(config) == 1 else "identity"


def pool(pooling: Pooling, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, hidden), (batch, seq) -> (batch, hidden)."""
    match pooling:
        case Pooling.CLS:
            return hidden[:, 0]
        case Pooling.MEAN:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        case Pooling.LAST_TOKEN:
            # index of the last real token: right or left padding alike
            positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
            last = (positions * mask).argmax(-1)  # (batch,)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        case Pooling.SPLADE | Pooling.RANK | Pooling.EOS:
            raise ValueError(f"{pooling.value} does not pool hidden states: that is its own head's work")
    raise ValueError(f"unknown pooling {pooling!r}")


_DENSE, _SPARSE, _CLASSIFIER, _LABELS, _TOWERS = DenseHead(), SparseHead(), ClassifierHead(), LabelsHead(), TowerHead()
_VISION_LANGUAGE = VisionLanguageHead()


def head_for(pooling: Pooling, *, image_tower: bool = False, vision_language: bool = False, labels: int = 1) -> Head:
    """The head a card's pooling calls for (two-tower and vision-language architectures have their own; ``rank``
    with more than one label is a text classifier)."""
    if image_tower:
        return _TOWERS
    if vision_language:
        return _VISION_LANGUAGE
    match pooling:
        case Pooling.CLS | Pooling.MEAN | Pooling.LAST_TOKEN:
            return _DENSE
        case Pooling.EOS:
            raise ConfigError("eos pooling is CLIP's text tower's own rule; it is not offered for other models")
        case Pooling.SPLADE:
            return _SPARSE
        case Pooling.RANK:
            return _CLASSIFIER if labels == 1 else _LABELS
    raise ConfigError(f"pooling '{pooling}' is not one of: {', '.join(p.value for p in Pooling)}")
