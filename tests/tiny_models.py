"""Tiny random-weight models of every registered architecture, built offline in seconds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from toolkit.corpus import load_corpus

__all__ = ["TINY_CONFIGS", "build_tiny_model"]

_COMMON = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "max_position_embeddings": 128}
_DECODER = {**_COMMON, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0}

# model_type -> (config overrides, tokenizer kind); one entry per ARCHITECTURES key (a test checks it)
TINY_CONFIGS: dict[str, tuple[dict, str]] = {
    "bert": ({"type_vocab_size": 2}, "wordpiece"),
    "roberta": ({"type_vocab_size": 1, "pad_token_id": 1, "max_position_embeddings": 130}, "bpe"),
    "xlm-roberta": ({"type_vocab_size": 1, "pad_token_id": 1, "max_position_embeddings": 130}, "unigram"),
    "mpnet": ({"pad_token_id": 1, "max_position_embeddings": 130}, "wordpiece"),
    "modernbert": ({"global_attn_every_n_layers": 2, "local_attention": 16, "pad_token_id": 0,
                    "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3}, "wordpiece"),
    "nomic_bert": ({"type_vocab_size": 2, "pad_token_id": 0}, "wordpiece"),
    "gte": ({"type_vocab_size": 2, "pad_token_id": 0}, "wordpiece"),
    "qwen2": (_DECODER, "bpe"),
    "qwen3": (_DECODER, "bpe"),
    "llama": (_DECODER, "bpe"),
    "mistral": ({**_DECODER, "sliding_window": None}, "bpe"),
    "gemma3_text": ({**_DECODER, "use_bidirectional_attention": True, "sliding_window": 16, "query_pre_attn_scalar": 8,
                     "layer_types": ["sliding_attention", "full_attention"]}, "bpe"),
}

_SPECIALS = ["[PAD]", "<s>", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "</s>"]


def _train_tokenizer(kind: str, vocab_size: int, decoder: bool):
    """A trained tokenizer, trained once per (kind, size, decoder) per session: each call gets its own copy."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_json(kind, vocab_size, decoder))


@functools.cache
def _trained_json(kind: str, vocab_size: int, decoder: bool) -> str:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    texts = load_corpus(limit=2000)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS)
        tok.decoder = decoders.WordPiece()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS, unk_token="[UNK]")
        tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    if decoder:  # decoders: append EOS, pooled by the last token
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    else:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok.to_str()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(model_type: str, folder: Path, *, splade: bool = False, classifier: bool = False, seed: int = 0,
                     config: dict | None = None) -> Path:
    """Save a random-weight ``model_type`` model with a trained tokenizer into ``folder`` (``config``: overrides);
    ``splade``: with a masked-LM head; ``classifier``: a one-label sequence classifier (a cross-encoder)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedTokenizerFast

    from toolkit.export.architectures import get_arch

    overrides, kind = TINY_CONFIGS[model_type]
    arch = get_arch(model_type)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**_COMMON, **overrides, **(config or {})})
    if classifier:
        from transformers import AutoModelForSequenceClassification

        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config).eval()
    else:
        model = (AutoModelForMaskedLM if splade else AutoModel).from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok = _train_tokenizer(kind, config.vocab_size, arch.decoder)
    pad = "[PAD]"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="</s>",
                                   padding_side="left" if arch.decoder else "right",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"]
                                   if arch.token_type_ids else ["input_ids", "attention_mask"])
    if arch.decoder:  # decoders get a small chat template, as the real ones (Qwen3, Llama) have
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pad_token_id"] = tok.token_to_id(pad)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def add_sentence_transformers_layout(folder: Path, *, pooling: str, dense_dims: list[int] | None = None,
                                     normalize: bool = True, prompts: dict[str, str] | None = None,
                                     max_seq_length: int = 96) -> Path:
    """Wrap a saved model in sentence-transformers' on-disk layout (Pooling, Dense, Normalize, prompts)."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(folder), max_seq_length=max_seq_length)
    mode = {"last_token": "lasttoken"}.get(pooling, pooling)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=mode)]
    width = transformer.get_word_embedding_dimension()
    for out in dense_dims or []:
        modules.append(models.Dense(width, out, activation_function=__import__("torch").nn.Tanh()))
        width = out
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, device="cpu")
    st.save(str(folder))
    st_config = folder / "config_sentence_transformers.json"
    data = json.loads(st_config.read_text())
    data["prompts"] = prompts or {}
    st_config.write_text(json.dumps(data, indent=2))
    return folder
