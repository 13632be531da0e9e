"""jina-embeddings-v3 without its remote code: its checkpoint read into transformers' XLM-RoBERTa, its five task
LoRAs into PEFT adapters.

The checkpoint (``XLMRobertaLoRA``, jinaai/xlm-roberta-flash-implementation) is an XLM-RoBERTa with rotary
positions and a LoRA parametrization on every Linear and Embedding. What is read here, and from where (the facts
were checked against jina's ``modeling_lora.py``, ``modeling_xlm_roberta.py``, ``embedding.py``, ``mlp.py`` and
``custom_st.py``, and against vLLM's ``bert_with_rope.py``, which loads the same weights):

- config.json: sizes, ``layer_norm_eps``, ``hidden_act`` (exact GELU), ``rotary_emb_base`` (20000), the task
  names in adapter order (``lora_adaptations``), ``lora_rank`` / ``lora_alpha`` (scaling alpha / rank), the task
  prompts (``task_instructions``: only the two retrieval tasks have text), ``matryoshka_dimensions``;
- weights (prefix ``roberta.``): ``<module>.parametrizations.weight.original`` is the base weight,
  ``...weight.0.lora_A`` / ``lora_B`` every task's factors, stacked on a first axis of 5. A Linear's delta is
  ``scaling * lora_B[t] @ lora_A[t]`` ((out, r) @ (r, in)); an Embedding's ``scaling * lora_A[t] @ lora_B[t]``
  ((vocab, r) @ (r, dim)). ``mixer.Wqkv`` holds the query, key and value rows in that order; ``emb_ln`` is the
  embeddings' LayerNorm; blocks are post-norm (``norm1`` after attention, ``norm2`` after the MLP); no position
  table: rotary positions 0, 1, 2, ... per text, half-split (GPT-NeoX) rotation over the whole head;
- jina's ``encode(task=...)`` prepends the task's instruction, runs that task's LoRA, mean-pools and normalizes
  (a Matryoshka size cut before normalizing); with no task it runs the base weights.

``convert`` writes a transformers XLM-RoBERTa folder (its position table zeros: transformers adds it, the model has
none; ``rotary_emb_base`` kept in its config) and one PEFT LoRA folder per task (the Wqkv factors split into
query / key / value: each gets A and its own rows of B). ``RotaryQueryKey`` then wraps the query and key projections
of the loaded model so the rotation follows them, LoRA included, as in jina's attention.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.errors import ConfigError

__all__ = ["ROTARY_KEY", "RotaryQueryKey", "convert", "install_rotary", "is_jina_v3", "task_card_fields"]

ROTARY_KEY = "rotary_emb_base"  # kept in the converted config.json: the loader installs the rotation
_ARCHITECTURE = "XLMRobertaLoRA"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")


def is_jina_v3(config: dict) -> bool:
    """A jina-embeddings-v3 checkpoint: ``XLMRobertaLoRA`` with rotary positions and task LoRAs."""
    return _ARCHITECTURE in (config.get("architectures") or []) and bool(config.get("lora_adaptations"))


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: a jina-embeddings-v3 checkpoint needs model.safetensors")
    return load_file(str(path))


def _module_map(layers: int) -> dict[str, str]:
    """jina's module names -> transformers' XLM-RoBERTa names (without the Wqkv split)."""
    names = {"embeddings.word_embeddings": "embeddings.word_embeddings",
             "embeddings.token_type_embeddings": "embeddings.token_type_embeddings", "emb_ln": "embeddings.LayerNorm"}
    for i in range(layers):
        jina, hf = f"encoder.layers.{i}", f"encoder.layer.{i}"
        names |= {f"{jina}.mixer.out_proj": f"{hf}.attention.output.dense",
                  f"{jina}.norm1": f"{hf}.attention.output.LayerNorm", f"{jina}.mlp.fc1": f"{hf}.intermediate.dense",
                  f"{jina}.mlp.fc2": f"{hf}.output.dense", f"{jina}.norm2": f"{hf}.output.LayerNorm"}
    return names


def convert(model_dir: Path, out: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """The checkpoint as (a transformers XLM-RoBERTa folder, [(task, its PEFT adapter folder)]) under ``out``."""
    from safetensors.numpy import save_file

    config = json.loads((model_dir / "config.json").read_text())
    tasks = list(config["lora_adaptations"])
    if config.get("position_embedding_type", "rotary") != "rotary":
        raise ConfigError(f"{model_dir}: position_embedding_type {config.get('position_embedding_type')!r}; "
                          "jina-embeddings-v3 reads rotary positions")
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    rank, alpha = int(config.get("lora_rank", 4)), float(config.get("lora_alpha", 1))
    raw = _weights(model_dir)
    names = _module_map(layers)
    base: dict[str, np.ndarray] = {}
    factors: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}  # hf module -> (A, B, kind)

    def take(jina: str, hf: str, kind: str) -> None:
        prefix = f"roberta.{jina}"
        if f"{prefix}.parametrizations.weight.original" in raw:
            base[f"{hf}.weight"] = raw[f"{prefix}.parametrizations.weight.original"]
            factors[hf] = (raw[f"{prefix}.parametrizations.weight.0.lora_A"],
                           raw[f"{prefix}.parametrizations.weight.0.lora_B"], kind)
        elif f"{prefix}.weight" in raw:
            base[f"{hf}.weight"] = raw[f"{prefix}.weight"]
        else:
            raise ConfigError(f"{model_dir}: no weight for {prefix} (not jina-embeddings-v3's layout)")
        if f"{prefix}.bias" in raw:
            base[f"{hf}.bias"] = raw[f"{prefix}.bias"]

    for jina, hf in names.items():
        take(jina, hf, "embedding" if "embeddings" in jina else "linear")
    for i in range(layers):  # Wqkv: rows q, k, v
        prefix, hf = f"roberta.encoder.layers.{i}.mixer.Wqkv", f"encoder.layer.{i}.attention.self"
        try:
            weight, bias = raw[f"{prefix}.parametrizations.weight.original"], raw[f"{prefix}.bias"]
            a, b = raw[f"{prefix}.parametrizations.weight.0.lora_A"], raw[f"{prefix}.parametrizations.weight.0.lora_B"]
        except KeyError as exc:
            raise ConfigError(f"{model_dir}: no {exc.args[0]} (not jina-embeddings-v3's layout)") from None
        for k, part in enumerate(("query", "key", "value")):
            rows = slice(k * hidden, (k + 1) * hidden)
            base[f"{hf}.{part}.weight"], base[f"{hf}.{part}.bias"] = weight[rows], bias[rows]
            factors[f"{hf}.{part}"] = (a, b[:, rows], "linear")
    base["embeddings.position_embeddings.weight"] = np.zeros(
        (int(config.get("max_position_embeddings", 8194)), hidden), dtype=base["embeddings.LayerNorm.weight"].dtype)
    transformer = out / "xlm-roberta"
    transformer.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in base.items()}, str(transformer / "model.safetensors"))
    hf_config = {
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "vocab_size": int(config["vocab_size"]),
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": int(config["num_attention_heads"]),
        "intermediate_size": int(config["intermediate_size"]), "hidden_act": config.get("hidden_act", "gelu"),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-5)),
        "type_vocab_size": int(config.get("type_vocab_size", 1)),
        "max_position_embeddings": int(config.get("max_position_embeddings", 8194)),
        "pad_token_id": int(config.get("pad_token_id", 1)), "bos_token_id": int(config.get("bos_token_id", 0)),
        "eos_token_id": int(config.get("eos_token_id", 2)), "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, ROTARY_KEY: float(config.get(ROTARY_KEY, 10000.0)),
    }
    (transformer / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, transformer / name)
    adapters = []
    for t, task in enumerate(tasks):
        folder = out / "adapters" / task
        folder.mkdir(parents=True, exist_ok=True)
        tensors, targets = {}, []
        for module, (a, b, kind) in factors.items():
            target = _rotary_inner(module)
            key = f"base_model.model.{target}"
            if kind == "embedding":  # PEFT's Embedding LoRA: delta = lora_embedding_A.T @ lora_embedding_B.T
                tensors[f"{key}.lora_embedding_A"] = np.ascontiguousarray(a[t].T)  # (r, vocab)
                tensors[f"{key}.lora_embedding_B"] = np.ascontiguousarray(b[t].T)  # (dim, r)
            else:  # delta = lora_B.weight @ lora_A.weight
                tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[t])  # (r, in)
                tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[t])  # (out, r)
            targets.append(target)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": targets, "task_type": None, "base_model_name_or_path": str(model_dir)}, indent=2))
        adapters.append((task, folder))
    return transformer, adapters


def _rotary_inner(module: str) -> str:
    """Where a query or key projection lives once ``install_rotary`` wrapped it."""
    return module + ".inner" if module.endswith((".query", ".key")) else module


def task_card_fields(model_dir: Path) -> dict:
    """Card fields from the checkpoint's config: each task's prompt (its instruction, empty for most), the
    Matryoshka sizes, mean pooling, normalized, and each prompt name's adapter (the task of the same name)."""
    config = json.loads((model_dir / "config.json").read_text())
    tasks = list(config["lora_adaptations"])
    instructions = config.get("task_instructions") or {}
    dims = sorted(int(d) for d in config.get("matryoshka_dimensions") or () if int(d) < int(config["hidden_size"]))
    return {"pooling": "mean", "normalize": True, "prompts": {task: instructions.get(task, "") for task in tasks},
            "prompt_adapters": {task: task for task in tasks}, "matryoshka_dims": dims}


class RotaryQueryKey(nn.Module):
    """A query or key projection followed by jina's rotation: per head, the half-split (GPT-NeoX) rotary embedding
    over the whole head at positions 0, 1, 2, ... of the sequence (``inner``: the projection, a LoRA slot may wrap
    it; the rotation follows the LoRA, as jina's Wqkv output is rotated)."""

    def __init__(self, inner: nn.Module, heads: int, base: float) -> None:
        super().__init__()
        self.inner, self.heads = inner, heads
        dim = inner.out_features // heads
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        batch, seq, width = y.shape
        y = y.view(batch, seq, self.heads, width // self.heads)
        angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=y.device), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, seq, 1, dim)
        first, second = y.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
        return (y * angles.cos() + rotated * angles.sin()).reshape(batch, seq, width)


def install_rotary(model: nn.Module, base: float) -> nn.Module:
    """Every XLM-RoBERTa self-attention's query and key projections of ``model`` wrapped in ``RotaryQueryKey``."""
    found = 0
    for module in list(model.modules()):
        if hasattr(module, "query") and hasattr(module, "key") and isinstance(module.query, nn.Linear):
            heads = int(module.num_attention_heads)
            module.query = RotaryQueryKey(module.query, heads, base)
            module.key = RotaryQueryKey(module.key, heads, base)
            found += 1
    if not found:
        raise ConfigError("rotary_emb_base is set, but the model has no XLM-RoBERTa self-attention to rotate")
    return model
