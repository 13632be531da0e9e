"""Step 2: ONE torch module, encoder -> pooling -> dense -> heads -> normalization.

Outputs, in order (the graph contract; see README):
  sentence_embedding       (batch, dim)     final, normalized as the card says
  token_embeddings         (batch, seq, hidden)
  sentence_embedding_raw   (batch, dim)     after the dense heads, never normalized
  sentence_embedding_<d>   (batch, d)       one per Matryoshka dim: slice, THEN normalize
Sparse (SPLADE) heads output only ``sparse_embedding`` (batch, vocab); see ``export.heads``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from toolkit.cards import ModelCard
from toolkit.errors import ConfigError
from toolkit.export.heads import Head
from toolkit.export.jina_v3 import ROTARY_KEY, install_rotary
from toolkit.export.resolve import DenseSpec, ResolvedModel

__all__ = ["EmbeddingModule", "build_module", "output_names"]


def output_names(resolved: ResolvedModel) -> list[str]:
    return resolved.head.outputs(resolved.card)


class EmbeddingModule(nn.Module):
    """The whole embedding model as one traceable module: the encoder, then its head (``export.heads``)."""

    def __init__(self, encoder: nn.Module, card: ModelCard, dense: nn.Module | None, token_type_ids: bool,
                 head: Head, instruction_end: list[int] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.card = card
        self.head = head
        self.dense = dense if dense is not None else nn.Identity()
        self.token_type_ids = token_type_ids
        self.instruction_end = list(instruction_end or [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:  # None: a model read without one (SigLIP's text tower)
            kwargs["attention_mask"] = attention_mask
        if self.token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        pool_mask = attention_mask
        if self.instruction_end:  # the head pools over the text after the instruction only
            pool_mask = after_instruction(input_ids, attention_mask, self.instruction_end)
        return self.head.forward(self.encoder(**kwargs), pool_mask, self.dense, self.card)


def after_instruction(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """``attention_mask`` with the instruction masked out: every position before the end of the first occurrence
    of ``marker`` (token ids), or only the first token (BOS) when the marker is absent, as vLLM's GritLM pooler."""
    width, length = len(marker), input_ids.shape[1]
    padded = nn.functional.pad(input_ids, (0, width - 1), value=-1)
    windows = torch.stack([padded[:, k:k + length] for k in range(width)], dim=-1)  # (batch, seq, width)
    pattern = torch.tensor(marker, dtype=input_ids.dtype, device=input_ids.device)
    hits = (windows == pattern).all(-1)  # (batch, seq): the marker starts here
    first = hits.to(torch.int64).argmax(-1)
    start = torch.where(hits.any(-1), first + width, torch.ones_like(first))
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
    return attention_mask * (positions >= start.unsqueeze(-1)).to(attention_mask.dtype)


def padding_only_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 2-D padding mask as the additive 4-D mask (batch, 1, query, key) that transformers' decoders take as-is:
    every position attends to every real token, both ways (no causal mask)."""
    keys = attention_mask[:, None, None, :].to(torch.float32)
    return ((1.0 - keys) * torch.finfo(torch.float32).min).expand(-1, 1, attention_mask.shape[1], -1)


class BidirectionalMask(nn.Module):
    """A decoder read without its causal mask: the 2-D padding mask becomes the additive 4-D mask
    (batch, 1, query, key) that transformers' decoders take as-is, so every token attends to every real token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=padding_only_mask(attention_mask), **kwargs)


def _load_dense(spec: DenseSpec) -> nn.Module:
    linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
    weights = _read_weights(spec.path)
    if spec.key is not None:  # one tensor of a file that holds more (the encoder's too)
        weights = {"weight": weights[spec.key]}
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    activation = {"Identity": nn.Identity, "Tanh": nn.Tanh, "ReLU": nn.ReLU, "GELU": nn.GELU,
                  "Sigmoid": nn.Sigmoid, "SiLU": nn.SiLU}[spec.activation]()
    return nn.Sequential(linear, activation)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_encoder(resolved: ResolvedModel, *, trust_remote_code: bool) -> nn.Module:
    """The Hugging Face encoder, loaded with the head's Auto class, in eval mode, fp32."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own progress

    arch = resolved.arch
    config = AutoConfig.from_pretrained(resolved.transformer_dir, trust_remote_code=trust_remote_code)
    for key, value in arch.config_overrides.items():
        setattr(config, key, value)
    auto = {"AutoModel": AutoModel, "AutoModelForMaskedLM": AutoModelForMaskedLM,
            "AutoModelForSequenceClassification": AutoModelForSequenceClassification}[resolved.head.auto_class]
    try:
        model = auto.from_pretrained(
            resolved.transformer_dir, config=config, attn_implementation=arch.attn_implementation,
            trust_remote_code=trust_remote_code, dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{resolved.transformer_dir}: cannot load the model: {exc}") from None
    model = model.eval()
    rotary = getattr(config, ROTARY_KEY, None)
    if rotary and config.model_type == "xlm-roberta":  # jina-embeddings-v3, converted (export.jina_v3)
        install_rotary(model, float(rotary))
    if resolved.card.bidirectional:
        model = BidirectionalMask(model)
    return resolved.head.wrap(model).eval()


def build_module(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> EmbeddingModule:
    encoder = load_encoder(resolved, trust_remote_code=trust_remote_code)
    dense = nn.Sequential(*(_load_dense(d) for d in resolved.dense)) if resolved.dense else None
    return EmbeddingModule(encoder, resolved.card, dense, resolved.arch.token_type_ids, resolved.head,
                           instruction_end_ids(resolved)).eval()


def instruction_end_ids(resolved: ResolvedModel) -> list[int]:
    """The card's ``instruction_end_tokens`` as ids of the model's vocabulary (ConfigError naming a missing one)."""
    tokens = resolved.card.instruction_end_tokens
    if not tokens:
        return []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved.transformer_dir)
    vocab = tok.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ConfigError(f"instruction_end_tokens {missing} are not in the model's vocabulary")
    return [vocab[t] for t in tokens]
