"""Tiny random-weight models of every registered architecture, built offline in seconds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from toolkit.corpus import load_corpus

__all__ = ["GENERIC_DECODERS", "TINY_CONFIGS", "build_remote_code_model", "build_tiny_colbert", "build_tiny_llava_next",
           "build_tiny_model"]

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
    "ernie": ({"type_vocab_size": 2, "use_task_id": True, "task_type_vocab_size": 3, "pad_token_id": 0}, "wordpiece"),
    "gemma2": ({**_DECODER, "sliding_window": 16, "query_pre_attn_scalar": 8}, "bpe"),
    "qwen2": (_DECODER, "bpe"),
    "qwen3": (_DECODER, "bpe"),
    "llama": (_DECODER, "bpe"),
    "mistral": ({**_DECODER, "sliding_window": None}, "bpe"),
    "gemma3_text": ({**_DECODER, "use_bidirectional_attention": True, "sliding_window": 16, "query_pre_attn_scalar": 8,
                     "layer_types": ["sliding_attention", "full_attention"]}, "bpe"),
    # two towers (build_multimodal): CLIP with the real CLIP BPE vocabulary, SigLIP with a trained Unigram
    "clip": ({}, "clip-bpe"),
    "siglip": ({}, "unigram"),
    # a vision-language model (build_tiny_qwen2_vl): Qwen's special tokens added to a trained BPE
    "qwen2_vl": ({}, "bpe"),
    "qwen2_5_vl": ({}, "bpe"),
    "qwen3_vl": ({}, "bpe"),
    "llava_next": ({}, "bpe"),  # build_tiny_llava_next: Llama 3's special tokens and <image> added to a trained BPE
}

# causal LMs outside the registry: the generic decoder path (vLLM's --convert embed) exports them
GENERIC_DECODERS: dict[str, tuple[dict, str]] = {
    "phi3": ({**_DECODER, "pad_token_id": 0}, "bpe"),
    "olmo2": (_DECODER, "bpe"),
    "granite": ({**_DECODER, "embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                 "logits_scaling": 4.0}, "bpe"),
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


def build_tiny_model(model_type: str, folder: Path, *, splade: bool = False, classifier: bool | list[str] = False,
                     seed: int = 0, config: dict | None = None, base_class: bool = False) -> Path:
    """Save a random-weight ``model_type`` model with a trained tokenizer into ``folder`` (``config``: overrides);
    ``splade``: with a masked-LM head; ``classifier``: a sequence classifier, True for one label (a cross-encoder)
    or its label names (a text classifier with ``id2label``); ``base_class``: a generic decoder saved as its base
    model (``GraniteModel``), as many embedding checkpoints are."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedTokenizerFast

    from toolkit.export.architectures import get_arch

    generic = model_type in GENERIC_DECODERS
    overrides, kind = GENERIC_DECODERS[model_type] if generic else TINY_CONFIGS[model_type]
    arch = get_arch(model_type, {"architectures": ["ForCausalLM"]} if generic else None)
    if arch.image_tower:
        return build_multimodal(model_type, folder, seed=seed, config=config)
    if arch.vision_language:
        return build_tiny_qwen2_vl(folder, seed=seed, config=config, family=model_type)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**_COMMON, **overrides, **(config or {})})
    if classifier:
        from transformers import AutoModelForSequenceClassification

        labels = ["LABEL_0"] if classifier is True else list(classifier)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_config(config).eval()
    elif generic and not base_class:  # saved as the Hub ships a causal LM: *ForCausalLM, weights under "model."
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config).eval()
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
                                     max_seq_length: int = 96, trust_remote_code: bool = False) -> Path:
    """Wrap a saved model in sentence-transformers' on-disk layout (Pooling, Dense, Normalize, prompts)."""
    from sentence_transformers import SentenceTransformer, models

    remote = {"trust_remote_code": True} if trust_remote_code else {}
    transformer = models.Transformer(str(folder), max_seq_length=max_seq_length, model_args=remote,
                                     tokenizer_args=remote, config_args=remote)
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


COLBERT_MARKERS = ("[unused0]", "[unused1]")  # the query / document markers of ColBERTv2 and answerai-colbert


def add_lora_adapters(folder: Path, adapters: dict[str, dict]) -> dict[str, Path]:
    """PEFT LoRA adapters of the model in ``folder``, one per name (``LoraConfig`` keywords each), saved beside it
    (``folder.parent / name``), B initialised at random (PEFT's default zeros would change nothing) with the
    adapter's position as the seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    made = {}
    for seed, (name, config) in enumerate(adapters.items()):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModel.from_pretrained(folder), LoraConfig(init_lora_weights=False, **config))
        model.save_pretrained(folder.parent / name)
        made[name] = folder.parent / name
    return made


def build_tiny_lora(folder: Path) -> Path:
    """A tiny BERT (sentence-transformers layout: mean pooling, normalized) in ``folder / "base"``, with two LoRA
    adapters beside it: ``support`` (r=8 on query and value) and ``legal`` (r=4 on every Linear of the encoder)."""
    base = build_tiny_model("bert", folder / "base")
    add_sentence_transformers_layout(base, pooling="mean")
    add_lora_adapters(base, {"support": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                             "legal": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"]}})
    return folder


def build_tiny_colbert(folder: Path, *, seed: int = 0, query_length: int = 16, document_length: int = 48,
                       pylate: bool = False, encoder: Path | None = None) -> Path:
    """A random-weight ColBERT saved by sentence-transformers 6's ``MultiVectorEncoder``: a tiny BERT, a bias-free
    ``Dense`` to 128 per token, the punctuation skiplist for documents, query expansion with [MASK] to
    ``query_length`` tokens, the ``[unused0] `` / ``[unused1] `` prompts (special tokens of the tokenizer, as
    sentence-transformers registers them). ``pylate``: rewritten in PyLate v3's layout (modules.json lists only the
    Transformer and the Dense; the knobs sit flat in config_sentence_transformers.json), which the library loads to
    the same model. ``encoder``: a BERT folder to start from instead of the tiny one (a ColBERT of its shape and
    weights, with a random projection: benchmarks/late_interaction_bench.py)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tiny-colbert-") as tmp:  # the plain BERT the encoder is saved from
        _save_colbert(Path(tmp) / "bert", folder, seed, query_length, document_length, special=not pylate,
                      encoder=encoder)
    if pylate:
        _as_pylate_v3(folder, query_length, document_length)
    return folder


def _save_colbert(base: Path, folder: Path, seed: int, query_length: int, document_length: int, *,
                  special: bool, encoder: Path | None = None) -> None:
    """``special``: the markers are special tokens of the tokenizer; else plain vocabulary entries that the
    pre-tokenizer splits (as in BERT's vocab.txt), which the library registers as special tokens for PyLate saves."""
    import string

    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
    from transformers import AutoModel, PreTrainedTokenizerFast

    if encoder is None:
        build_tiny_model("bert", base, seed=seed, config={"initializer_range": 0.2})
    else:  # its transformers files only (a sentence-transformers layout's modules are rebuilt below)
        import shutil

        base.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json"):
            if (encoder / name).is_file():
                shutil.copy(encoder / name, base / name)
    if special:
        tok = PreTrainedTokenizerFast.from_pretrained(base)
        tok.add_special_tokens({"additional_special_tokens": list(COLBERT_MARKERS)})
        tok.save_pretrained(base)
    else:
        data = json.loads((base / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        for marker in COLBERT_MARKERS:
            vocab[marker] = len(vocab)
        (base / "tokenizer.json").write_text(json.dumps(data))
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    model = AutoModel.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(base)
    torch.manual_seed(seed)
    transformer = Transformer(str(base), document_length=document_length,
                              query_expansion={"strategy": "fixed", "length": query_length})
    width = transformer.get_embedding_dimension()
    modules = [transformer, Dense(width, 128, bias=False, activation_function=torch.nn.Identity(),
                                  module_input_name="token_embeddings"),
               MultiVectorMask(skiplist_words=list(string.punctuation)), Normalize(module_input_name="token_embeddings")]
    mve = MultiVectorEncoder(modules=modules, device="cpu",
                             prompts={"query": f"{COLBERT_MARKERS[0]} ", "document": f"{COLBERT_MARKERS[1]} "})
    mve.save(str(folder))


def _as_pylate_v3(folder: Path, query_length: int, document_length: int) -> None:
    """Rewrite a MultiVectorEncoder save in PyLate v3's layout (``model_type`` ColBERT, flat knobs)."""
    import string

    modules = json.loads((folder / "modules.json").read_text())
    kept = [m for m in modules if m["type"].rsplit(".", 1)[-1] in ("Transformer", "Dense")]
    for m in kept:
        if m["type"].endswith("Dense"):
            m["type"] = "pylate.models.Dense.Dense"
    (folder / "modules.json").write_text(json.dumps(kept, indent=2))
    st_cfg = folder / "config_sentence_transformers.json"
    data = json.loads(st_cfg.read_text())
    data.pop("prompts", None)
    data.update({"model_type": "ColBERT", "query_prefix": "[unused0]", "document_prefix": "[unused1]",
                 "query_length": query_length, "document_length": document_length, "attend_to_expansion_tokens": False,
                 "skiplist_words": list(string.punctuation), "do_query_expansion": True})
    st_cfg.write_text(json.dumps(data, indent=2))


def build_tiny_stanford_colbert(folder: Path, *, seed: int = 2, query_length: int = 16,
                                document_length: int = 48) -> Path:
    """A random-weight ColBERT in Stanford-NLP ColBERT's layout (colbert-ir/colbertv2.0's): ``config.json`` with
    ``architectures: ["HF_ColBERT"]``, one ``model.safetensors`` holding the encoder under ``bert.`` and the
    projection as ``linear.weight`` (128 x hidden, no bias), ``artifact.metadata`` with the markers, lengths and
    ``mask_punctuation``; the markers plain vocabulary entries, as in BERT's vocab.txt."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    build_tiny_model("bert", folder, seed=seed, config={"initializer_range": 0.2})
    data = json.loads((folder / "tokenizer.json").read_text())
    for marker in COLBERT_MARKERS:
        data["model"]["vocab"].setdefault(marker, len(data["model"]["vocab"]))
    (folder / "tokenizer.json").write_text(json.dumps(data))
    model = AutoModel.from_pretrained(folder)
    model.resize_token_embeddings(len(data["model"]["vocab"]))
    model.save_pretrained(folder)
    weights = {f"bert.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    torch.manual_seed(seed)
    weights["linear.weight"] = torch.randn(128, model.config.hidden_size) * 0.2
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["HF_ColBERT"]}, indent=2))
    (folder / "artifact.metadata").write_text(json.dumps({
        "query_token_id": COLBERT_MARKERS[0], "doc_token_id": COLBERT_MARKERS[1], "query_maxlen": query_length,
        "doc_maxlen": document_length, "dim": 128, "similarity": "cosine", "attend_to_mask_tokens": False,
        "mask_punctuation": True}, indent=2))
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


_REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=512, hidden_size=32, max_position_embeddings=128, pad_token_id=0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.max_position_embeddings = max_position_embeddings
'''

_REMOTE_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteModel(PreTrainedModel):
    """One self-attention block over learned positions: code that transformers does not ship."""

    config_class = TinyRemoteConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden_size
        self.words = nn.Embedding(config.vocab_size, h)
        self.positions = nn.Embedding(config.max_position_embeddings, h)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        x = self.words(input_ids) + self.positions(positions)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / (x.shape[-1] ** 0.5)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        x = self.norm(x + self.out(scores.softmax(-1) @ v))
        return BaseModelOutput(last_hidden_state=x)
'''


def build_remote_code_model(folder: Path, *, seed: int = 0) -> Path:
    """A model folder that carries its own modeling code and ``auto_map``, as gte-multilingual-base (NewModel) and
    snowflake-arctic-embed-m-v2.0 ship: loadable only with ``trust_remote_code``."""
    import importlib.util
    import sys

    import torch
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIG)
    (folder / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL.replace("from .configuration_tiny_remote",
                                                                          "from configuration_tiny_remote"))
    sys.path.insert(0, str(folder))  # build the weights with the folder's own classes
    try:
        spec = importlib.util.spec_from_file_location("modeling_tiny_remote", folder / "modeling_tiny_remote.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(seed)
        model = module.TinyRemoteModel(module.TinyRemoteConfig()).eval()
        model.save_pretrained(folder)
    finally:
        sys.path.remove(str(folder))
    (folder / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL)  # relative import, as transformers loads it
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyRemoteModel"],
               auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModel": "modeling_tiny_remote.TinyRemoteModel"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = _train_tokenizer("wordpiece", 512, False)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
                            ).save_pretrained(folder)
    return folder


QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]


def _tokenizer_with(specials: list[str]):
    """A trained BPE tokenizer (512 tokens) with ``specials`` added, and their ids."""
    tok = _train_tokenizer("bpe", 512, False)
    tok.add_special_tokens(specials)
    return tok, {t: tok.token_to_id(t) for t in specials}


def build_tiny_qwen2_vl(folder: Path, *, seed: int = 0, config: dict | None = None, family: str = "qwen2_vl") -> Path:
    """A random-weight ``Qwen2VLForConditionalGeneration`` (2 vision blocks of width 32, 2 decoder layers), or with
    ``family="qwen2_5_vl"`` a ``Qwen2_5_VLForConditionalGeneration`` (4 blocks, 2 of them attending within 2 x 2
    windows of merged patches), or ``"qwen3_vl"`` a ``Qwen3VLForConditionalGeneration`` (16-pixel patches, an 8 x 8
    learned position table, DeepStack rows from 2 of its 4 blocks), with a trained BPE tokenizer holding Qwen's special tokens, Qwen's chat template and
    a Pillow image processor config whose pixel bounds keep images small, saved as the Hub checkpoints are."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    tok, ids = _tokenizer_with(QWEN_VL_SPECIALS)
    text = {**_DECODER, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "bos_token_id": None}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if family == "qwen2_5_vl":  # hidden_size is the tower's width there; out_hidden_size the language model's
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
                  "fullatt_block_indexes": [1, 3], "window_size": 56, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2}
    patch, mean, std = 14, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if family == "qwen3_vl":  # 16-pixel patches (32-pixel merged units), mean and std 0.5, as Qwen3-VL's processor
        patch, mean, std = 16, [0.5] * 3, [0.5] * 3
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
                  "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                  "deepstack_visual_indexes": [1, 2]}
    cfg = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                       video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                       vision_end_token_id=ids["<|vision_end|>"], **(config or {}))
    model = model_class(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="right", model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    unit = 2 * patch  # a merged unit's side
    processor = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 4 * unit * unit,
                 "max_pixels": 16 * unit * unit, "patch_size": patch, "merge_size": 2, "temporal_patch_size": 2,
                 "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "do_convert_rgb": True, "image_mean": mean, "image_std": std}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def build_tiny_colqwen2(folder: Path, *, seed: int = 0, family: str = "qwen2_vl") -> Path:
    """A random-weight ``ColQwen2ForRetrieval`` over the tiny Qwen2-VL (or Qwen2.5-VL: ColQwen2.5) of
    ``build_tiny_qwen2_vl``, its projection to 128, saved with its ``ColQwen2Processor`` (the query prefix and the
    page prompt in processor_config.json, the image processor's settings with them) as transformers saves it."""
    import tempfile

    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoTokenizer,
        ColQwen2Config,
        ColQwen2ForRetrieval,
        ColQwen2Processor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with tempfile.TemporaryDirectory(prefix="tiny-colqwen2-base-") as scratch:
        base = build_tiny_qwen2_vl(Path(scratch), seed=seed, family=family)
        torch.manual_seed(seed + 1)
        model = ColQwen2ForRetrieval(ColQwen2Config(vlm_config=AutoConfig.from_pretrained(base), embedding_dim=128))
        model.vlm.load_state_dict(AutoModel.from_pretrained(base).state_dict())
        model.eval().save_pretrained(folder)
        processor = ColQwen2Processor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(base),
                                      tokenizer=AutoTokenizer.from_pretrained(base))
        processor.save_pretrained(folder)
    return folder


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<image>"]


def build_tiny_colpali(folder: Path, *, seed: int = 0) -> Path:
    """A random-weight ``ColPaliForRetrieval``: a PaliGemma (a 2-layer SigLIP tower on 28-pixel images of 14-pixel
    patches: 4 image tokens; a 2-layer Gemma) with its projection to 128, saved with its ``ColPaliProcessor``
    (SigLIP's image processor with ``image_seq_length``, a trained BPE holding Gemma's special tokens)."""
    import torch
    from transformers import (
        ColPaliConfig,
        ColPaliForRetrieval,
        ColPaliProcessor,
        PaliGemmaConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(seed)
    tok, ids = _tokenizer_with(GEMMA_SPECIALS)
    text = {**_DECODER, "model_type": "gemma", "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 512,
            "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"]}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 28, "patch_size": 14, "projection_dim": 32}
    vlm = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                          projection_dim=32, hidden_size=32)
    model = ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm, embedding_dim=128)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="right", model_input_names=["input_ids", "attention_mask"])
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.image_seq_length = 4
    ColPaliProcessor(image_processor=images, tokenizer=fast).save_pretrained(folder)
    return folder


# Qwen2-VL's own chat template, as its tokenizer_config.json ships it (images and videos as vision_start, pad, vision_end)
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] "
    "}}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>{% elif "
    "'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<image>"]


def build_tiny_llava_next(folder: Path, *, seed: int = 0) -> Path:
    """A random-weight ``LlavaNextForConditionalGeneration`` shaped as e5-v: a CLIP tower (28-pixel views of 14-pixel
    patches, 3 layers, features from the second to last as ``vision_feature_layer`` -2 says), tiles at 28 x 56,
    56 x 28, 56 x 56, 84 x 28 and 28 x 84, a 2-layer Llama; a BPE tokenizer holding Llama 3's special tokens that
    puts <|begin_of_text|> first, and ``<image>`` past the embedding table, as e5-v's image token 128256 is; its
    Pillow image processor config; saved as the Hub checkpoint is."""
    import torch
    from tokenizers import processors
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    tok, ids = _tokenizer_with(LLAMA3_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    text = {**_DECODER, "model_type": "llama", "vocab_size": ids["<image>"], "max_position_embeddings": 512,
            "pad_token_id": ids["<pad>"], "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|eot_id|>"]}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": 28, "patch_size": 14, "projection_dim": 32}
    cfg = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                          image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>", padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(folder)
    processor = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 28},
                 "crop_size": {"height": 28, "width": 28}, "image_grid_pinpoints": pinpoints, "resample": 3,
                 "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "do_pad": True, "do_convert_rgb": True,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


if __name__ == "__main__":  # scripts/setup.sh: the tiny models the README's examples export
    import argparse

    parser = argparse.ArgumentParser(description="Save a tiny random-weight model (for examples and tests).")
    parser.add_argument("kind", choices=["reranker", "classifier", "clip", "qwen2-vl", "qwen3-vl", "llava-next", "colbert",
                                         "colqwen2", "lora"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if not (args.folder / "config.json").is_file() and not (args.folder / "base" / "config.json").is_file():
        if args.kind == "lora":  # a base model and two PEFT LoRA adapters (docs/adapters.md)
            build_tiny_lora(args.folder)
        elif args.kind == "reranker":  # a one-label BertForSequenceClassification, scores spread apart (std 0.2)
            build_tiny_model("bert", args.folder, classifier=True, config={"initializer_range": 0.2})
        elif args.kind == "classifier":  # a three-label sentiment-style BertForSequenceClassification
            build_tiny_model("bert", args.folder, classifier=["negative", "neutral", "positive"],
                             config={"initializer_range": 0.2})
        elif args.kind == "qwen2-vl":  # a vision-language embedder's shape (GME), images up to 16 feature rows
            build_tiny_qwen2_vl(args.folder)
        elif args.kind == "qwen3-vl":  # Qwen3-VL-Embedding's shape: DeepStack, a learned position table, videos
            build_tiny_qwen2_vl(args.folder, family="qwen3_vl")
        elif args.kind == "colbert":  # a ColBERT (PyLate's shape): 128 per token, queries expanded to 16 tokens
            build_tiny_colbert(args.folder)
        elif args.kind == "colqwen2":  # a ColQwen2ForRetrieval over the tiny Qwen2-VL, 128 per token, its processor
            build_tiny_colqwen2(args.folder)
        elif args.kind == "llava-next":  # e5-v's shape: 28-pixel views, up to 3 tiles
            build_tiny_llava_next(args.folder)
        else:  # CLIP with its real 49408-token vocabulary, 32-pixel images
            build_tiny_model("clip", args.folder)

