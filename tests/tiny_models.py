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
    # two towers (build_multimodal): CLIP with the real CLIP BPE vocabulary, SigLIP with a trained Unigram
    "clip": ({}, "clip-bpe"),
    "siglip": ({}, "unigram"),
}

ROOT = Path(__file__).resolve().parents[1]
CLIP_BPE = ROOT / ".cache" / "models" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"  # scripts/setup.sh unpacks it

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
    if arch.image_tower:
        return build_multimodal(model_type, folder, seed=seed, config=config)
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


_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def clip_tokenizer():
    """CLIP's real tokenizer (49408 tokens) from the BPE merges file open_clip ships, built the way open_clip
    builds its vocabulary: the 256 byte symbols, the same with ``</w>``, one token per merge, then the two specials."""
    import gzip

    from transformers import CLIPTokenizer

    lines = gzip.open(CLIP_BPE).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    # GPT-2's byte alphabet, in its order: printable bytes stand for themselves, the rest map past 255
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=77)


def build_multimodal(model_type: str, folder: Path, *, seed: int = 0, config: dict | None = None) -> Path:
    """A random-weight CLIPModel or SiglipModel (32-pixel images, 8-pixel patches) with its tokenizer and image
    processor config, saved as the Hub checkpoints are (``config``: top-level overrides)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPModel,
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipModel,
    )

    torch.manual_seed(seed)
    vision = {**_TOWER, "image_size": 32, "patch_size": 8}
    folder.mkdir(parents=True, exist_ok=True)
    if model_type == "clip":
        if not CLIP_BPE.is_file():
            raise FileNotFoundError(f"{CLIP_BPE}: run scripts/setup.sh (it unpacks CLIP's vocabulary)")
        tok = clip_tokenizer()
        text = {**_TOWER, "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": 49406,
                "eos_token_id": 49407, "pad_token_id": 1}
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, **(config or {}))
        model = CLIPModel(cfg).eval()
        processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
                     "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                     "do_convert_rgb": True}
    else:
        trained = _train_tokenizer("unigram", 512, True)  # "$A </s>": SigLIP appends EOS, no BOS
        tok = PreTrainedTokenizerFast(tokenizer_object=trained, pad_token="</s>", eos_token="</s>", unk_token="[UNK]",
                                      model_max_length=64, model_input_names=["input_ids"])
        text = {**_TOWER, "vocab_size": 512, "max_position_embeddings": 64, "pad_token_id": trained.token_to_id("</s>"),
                "eos_token_id": trained.token_to_id("</s>")}
        cfg = SiglipConfig(text_config=text, vision_config=vision, **(config or {}))
        model = SiglipModel(cfg).eval()
        processor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                     "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True,
                     "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
