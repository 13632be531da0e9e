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
from toolkit.export.resolve import DenseSpec, ResolvedModel

__all__ = ["EmbeddingModule", "build_module", "output_names"]


def output_names(resolved: ResolvedModel) -> list[str]:
    return resolved.head.outputs(resolved.card)


class EmbeddingModule(nn.Module):
    """The whole embedding model as one traceable module: the encoder, then its head (``export.heads``)."""

    def __init__(self, encoder: nn.Module, card: ModelCard, dense: nn.Module | None, token_type_ids: bool,
                 head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.card = card
        self.head = head
        self.dense = dense if dense is not None else nn.Identity()
        self.token_type_ids = token_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:  # None: a model read without one (SigLIP's text tower)
            kwargs["attention_mask"] = attention_mask
        if self.token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        return self.head.forward(self.encoder(**kwargs), attention_mask, self.dense, self.card)


def _load_dense(spec: DenseSpec) -> nn.Module:
    linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
    weights = _read_weights(spec.path)
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
    return resolved.head.wrap(model.eval()).eval()


def build_module(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> EmbeddingModule:
    encoder = load_encoder(resolved, trust_remote_code=trust_remote_code)
    dense = nn.Sequential(*(_load_dense(d) for d in resolved.dense)) if resolved.dense else None
    return EmbeddingModule(encoder, resolved.card, dense, resolved.arch.token_type_ids, resolved.head).eval()
