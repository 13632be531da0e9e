"""Step 2: ONE torch module, encoder -> pooling -> dense -> heads -> normalization.

Outputs, in order (the graph contract; see README):
  sentence_embedding       (batch, dim)     final, normalized as the card says
  token_embeddings         (batch, seq, hidden)
  sentence_embedding_raw   (batch, dim)     after the dense heads, never normalized
  sentence_embedding_<d>   (batch, d)       one per Matryoshka dim: slice, THEN normalize
SPLADE models output only ``sparse_embedding`` (batch, vocab).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from toolkit.cards import ModelCard, Pooling
from toolkit.errors import ConfigError
from toolkit.export.resolve import DenseSpec, ResolvedModel

__all__ = ["EmbeddingModule", "build_module", "output_names"]


def output_names(card: ModelCard) -> list[str]:
    if card.pooling == Pooling.SPLADE:
        return ["sparse_embedding"]
    heads = [f"sentence_embedding_{d}" for d in card.matryoshka_dims]
    return ["sentence_embedding", "token_embeddings", "sentence_embedding_raw", *heads]


def _pool(pooling: Pooling, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        case Pooling.SPLADE:
            raise ValueError("SPLADE pools logits, not hidden states")
    raise ValueError(f"unknown pooling {pooling!r}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # x / max(||x||, eps), written out so every exporter produces the same small graph
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)


class EmbeddingModule(nn.Module):
    """The whole embedding model as one traceable module."""

    def __init__(self, encoder: nn.Module, card: ModelCard, dense: nn.Module | None, token_type_ids: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = card.pooling
        self.normalize = card.normalize
        self.dims = list(card.matryoshka_dims)
        self.dense = dense if dense is not None else nn.Identity()
        self.token_type_ids = token_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        if self.pooling == Pooling.SPLADE:
            logits = out.logits  # (batch, seq, vocab)
            weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
            return (weights.amax(dim=1),)
        hidden = out.last_hidden_state  # (batch, seq, hidden)
        raw = self.dense(_pool(self.pooling, hidden, attention_mask))  # (batch, dim)
        final = _normalize(raw) if self.normalize else raw
        heads = [_normalize(raw[:, :d]) if self.normalize else raw[:, :d] for d in self.dims]
        return (final, hidden, raw, *heads)


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
    """The Hugging Face encoder (or masked-LM for SPLADE) in eval mode, fp32."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own progress

    arch = resolved.arch
    config = AutoConfig.from_pretrained(resolved.transformer_dir, trust_remote_code=trust_remote_code)
    for key, value in arch.config_overrides.items():
        setattr(config, key, value)
    splade = resolved.card.pooling == Pooling.SPLADE
    if splade and not arch.splade:
        raise ConfigError(f"SPLADE pooling needs a masked-LM head; '{arch.model_type}' has none here")
    auto = AutoModelForMaskedLM if splade else AutoModel
    try:
        model = auto.from_pretrained(
            resolved.transformer_dir, config=config, attn_implementation=arch.attn_implementation,
            trust_remote_code=trust_remote_code, dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{resolved.transformer_dir}: cannot load the model: {exc}") from None
    return model.eval()


def build_module(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> EmbeddingModule:
    encoder = load_encoder(resolved, trust_remote_code=trust_remote_code)
    dense = nn.Sequential(*(_load_dense(d) for d in resolved.dense)) if resolved.dense else None
    return EmbeddingModule(encoder, resolved.card, dense, resolved.arch.token_type_ids).eval()
