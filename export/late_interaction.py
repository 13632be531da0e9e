"""Late-interaction (ColBERT) checkpoints: their layout read into declared facts, and their parity check.

Two on-disk layouts load as sentence-transformers 6's ``MultiVectorEncoder`` (the reference):

- its own saves (``config_sentence_transformers.json``: ``model_type`` "MultiVectorEncoder"): modules Transformer
  (``query_length``, ``document_length``, ``query_expansion`` in its ``sentence_bert_config.json``), Dense (per
  token), MultiVectorMask (``skiplist_words``, ``skiplist_tasks``), Normalize (per token); the prompts beside;
- PyLate v3 (``model_type`` "ColBERT"): only Transformer and Dense listed, the knobs flat in
  ``config_sentence_transformers.json`` (``query_prefix`` / ``document_prefix``, ``query_length`` as the expansion
  length, ``do_query_expansion``, ``attend_to_expansion_tokens``, ``skiplist_words``, default the punctuation);
  the library appends the MultiVectorMask and the Normalize, and registers the prefixes as special tokens;
- Stanford-NLP ColBERT (``colbert-ir/colbertv2.0``: ``config.json`` ``architectures`` ["HF_ColBERT"]): the encoder
  and the projection (``linear.weight``, no bias) in one weights file at the root, the knobs in
  ``artifact.metadata`` (``query_token_id`` / ``doc_token_id`` markers, ``query_maxlen`` as the [MASK] expansion
  length, ``doc_maxlen``, ``attend_to_mask_tokens``, ``mask_punctuation``, default true), read as
  ``MultiVectorEncoder._maybe_load_stanford_metadata`` reads them.

What the runtime needs is recorded as ``toolkit.manifest.LateInteraction``; the graph is ``MultiVectorHead``'s.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import ConfigError
from toolkit.manifest import LateInteraction, ParityCase

__all__ = ["MultiVectorLayout", "is_multi_vector", "multi_vector_check", "read_multi_vector"]

_MODEL_TYPES = ("MultiVectorEncoder", "ColBERT")  # sentence-transformers 6's own saves; PyLate v3's


@dataclass(frozen=True)
class MultiVectorLayout:
    """What a late-interaction checkpoint declares: card fields, its transformer folder, its Dense folders (in
    order), the runtime's facts, and the tokenizer with the legacy prefixes registered (None: unchanged)."""

    fields: dict
    transformer_dir: Path
    dense_dirs: tuple[Path, ...]
    late: LateInteraction
    tokenizer_json: str | None = None
    inline_dense: tuple[int, int] | None = None  # Stanford's: (out, in) of ``linear.weight`` in the root's weights


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def is_multi_vector(model_dir: Path) -> bool:
    """The folder is a MultiVectorEncoder (or PyLate v3) save, or a Stanford-NLP ColBERT checkpoint."""
    return _json(model_dir / "config_sentence_transformers.json").get("model_type") in _MODEL_TYPES \
        or _is_stanford(model_dir)


def _is_stanford(model_dir: Path) -> bool:
    return "HF_ColBERT" in (_json(model_dir / "config.json").get("architectures") or [])


def _stanford_projection(model_dir: Path) -> tuple[int, int]:
    """(out, in) of the root's ``linear.weight``, read from the weights file's header."""
    from safetensors import safe_open

    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: a Stanford-NLP ColBERT checkpoint needs model.safetensors (with linear.weight)")
    with safe_open(str(path), framework="np") as weights:
        if "linear.weight" not in weights.keys():
            raise ConfigError(f"{path}: no linear.weight (the ColBERT projection)")
        out_features, in_features = weights.get_slice("linear.weight").get_shape()
    return int(out_features), int(in_features)


def read_multi_vector(model_dir: Path) -> MultiVectorLayout:
    """Read a late-interaction layout as ``MultiVectorEncoder`` loads it; ConfigError for a module it cannot export
    (token pooling, an image allowlist: ColPali's)."""
    top = _json(model_dir / "config_sentence_transformers.json")
    pylate = top.get("model_type") == "ColBERT"
    stanford = not top and _is_stanford(model_dir)
    transformer_dir, dense_dirs, knobs = model_dir, [], {}
    mask: dict | None = None
    normalize = False
    for module in [] if stanford else _json_list(model_dir / "modules.json"):
        kind, sub = module["type"].rsplit(".", 1)[-1], model_dir / module.get("path", "")
        match kind:
            case "Transformer":
                transformer_dir = sub
                knobs = _json(sub / "sentence_bert_config.json") or _json(model_dir / "sentence_bert_config.json")
            case "Dense":
                if _json(sub / "config.json").get("module_input_name", "token_embeddings") != "token_embeddings":
                    raise ConfigError(f"{sub}: a multi-vector Dense must read token_embeddings")
                dense_dirs.append(sub)
            case "MultiVectorMask":
                mask = _json(sub / "config.json")
            case "Normalize":
                normalize = True
            case _:
                raise ConfigError(f"{model_dir}: multi-vector module '{kind}' is not supported (supported: "
                                  "Transformer, Dense, MultiVectorMask, Normalize)")
    prompts = {k: v for k, v in (top.get("prompts") or {}).items() if isinstance(v, str)}
    prefixes = {}
    if pylate:  # the library's translation of PyLate v3's flat knobs (saved Transformer values win)
        for key, mode in (("query_prefix", "query"), ("document_prefix", "document")):
            if key in top:
                prefixes[mode] = top[key] or ""
                prompts[mode] = prefixes[mode] + (prompts.get(mode) or "").removeprefix(prefixes[mode])
        legacy = {k: top[k] for k in ("query_length", "document_length", "query_expansion")
                  if k in top and (top[k] is not None or k == "query_expansion")}
        if "query_expansion" not in legacy:
            if top.get("do_query_expansion") is False:
                legacy["query_expansion"] = None
            else:
                length = legacy.pop("query_length", None) or top.get("query_length") or 32
                attend = top.get("attend_to_expansion_tokens", top.get("attend_to_mask_tokens"))
                legacy["query_expansion"] = {"strategy": "fixed", "attend": bool(attend), "length": length}
        knobs = {**legacy, **{k: v for k, v in knobs.items() if v is not None}}
        words = top.get("skiplist_words")
        mask = {"skiplist_words": list(string.punctuation) if words is None else words}
        normalize = True
    if stanford:  # the library's reading of artifact.metadata
        meta = _json(model_dir / "artifact.metadata")
        prefixes = {"query": (meta.get("query_token_id") or "[unused0]") + " ",
                    "document": (meta.get("doc_token_id") or "[unused1]") + " "}
        prompts = dict(prefixes)
        knobs = {"document_length": meta.get("doc_maxlen"),
                 "query_expansion": {"strategy": "fixed", "attend": bool(meta.get("attend_to_mask_tokens")),
                                     "length": meta.get("query_maxlen") or 32}}
        mask = {"skiplist_words": list(string.punctuation) if meta.get("mask_punctuation", True) else []}
        normalize = True
    if mask is None and (knobs.get("query_expansion") or {}).get("length"):
        raise ConfigError(f"{model_dir}: query expansion without a MultiVectorMask module (its positions would not "
                          "be scored) is not supported")
    mask = mask or {}
    if mask.get("keep_only_token_ids"):
        raise ConfigError(f"{model_dir}: keep_only_token_ids (image-patch documents, ColPali) is not supported")
    tokenizer = _tokenizer(transformer_dir, prefixes)
    expansion = knobs.get("query_expansion")
    expansion_id = -1
    if expansion:
        token = expansion.get("token")
        expansion_id = tokenizer.convert_tokens_to_ids(token) if token else tokenizer.mask_token_id
        if expansion_id is None:
            expansion_id = tokenizer.eos_token_id
    late = LateInteraction(
        prompts={"query": prompts.get("query") or "", "document": _document_prompt(prompts)},
        query_length=knobs.get("query_length"), document_length=knobs.get("document_length"),
        expansion=expansion.get("strategy") if expansion else None,
        expansion_length=int(expansion.get("length") or 0) if expansion else 0,
        expansion_id=int(expansion_id if expansion_id is not None else -1),
        attend_expansion=bool(expansion.get("attend")) if expansion else False,
        skiplist_ids=_skiplist_ids(tokenizer, mask.get("skiplist_words") or []),
        skiplist_modes=list(_as_list(mask.get("skiplist_tasks")) or ["document"]),
        similarity=top.get("similarity_fn_name") or "maxsim")
    if late.similarity not in ("maxsim", "meanmaxsim"):
        raise ConfigError(f"{model_dir}: similarity '{late.similarity}' is not one of: maxsim, meanmaxsim")
    fields = {"normalize": normalize, "prompts": {k: v for k, v in late.prompts.items() if v}}
    return MultiVectorLayout(fields, transformer_dir, tuple(dense_dirs), late,
                             tokenizer.backend_tokenizer.to_str() if prefixes else None,
                             _stanford_projection(model_dir) if stanford else None)


def _json_list(path: Path) -> list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _document_prompt(prompts: dict[str, str]) -> str:
    # encode_document's choice: the first of "document", "passage", "corpus" the model has
    return next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "")


def _tokenizer(folder: Path, prefixes: dict[str, str]):
    """The model's tokenizer as the library holds it: PyLate's prefixes that the tokenizer knows but splits are
    registered as special tokens (``MultiVectorEncoder._register_prefix_tokens``)."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    added, vocab, register = set(tokenizer.added_tokens_encoder), tokenizer.get_vocab(), []
    for value in prefixes.values():
        if not value or not value.split():
            continue
        for prefix in (value, value.split(None, 1)[0]):
            if prefix not in added and prefix not in vocab:
                continue
            if tokenizer.tokenize(prefix) != [prefix]:
                register.append(AddedToken(prefix, normalized=False, special=True))
            break
    if register:
        tokenizer.add_special_tokens({"additional_special_tokens": register})
    return tokenizer


def _skiplist_ids(tokenizer, words: list[str]) -> list[int]:
    """The skiplist's ids; words that are not one token of the vocabulary are left out, as the library does."""
    ids = []
    for word in words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is not None and (token_id != tokenizer.unk_token_id or word == tokenizer.unk_token):
            ids.append(int(token_id))
    return sorted(set(ids))


def multi_vector_check(model_dir: Path, emb, queries: list[str], documents: list[str],
                       padding_side: str) -> tuple[dict[str, float], list[ParityCase]]:
    """The artifact's ``embed_multi`` (queries, documents) and ``max_sim`` against ``MultiVectorEncoder``'s
    ``encode_query`` / ``encode_document`` / ``similarity``: the largest absolute difference of each, and a
    token-count mismatch as an infinite one."""
    from sentence_transformers import MultiVectorEncoder

    reference = MultiVectorEncoder(str(model_dir), device="cpu")
    ref_q = [np.asarray(t, dtype=np.float32) for t in reference.encode_query(queries, batch_size=len(queries))]
    ref_d = [np.asarray(t, dtype=np.float32) for t in reference.encode_document(documents, batch_size=len(documents))]
    ref_s = reference.similarity(ref_q, ref_d).numpy()
    got_q, got_d = emb.embed_multi(queries, is_query=True), emb.embed_multi(documents, is_query=False)
    largest = {"query vectors (encode_query)": _diff(got_q, ref_q),
               "document vectors (encode_document)": _diff(got_d, ref_d),
               "MaxSim (similarity)": float(np.abs(emb.max_sim(got_q, got_d) - ref_s).max())}
    cases = [ParityCase(output=name, batch=n, seq_len=max(len(m) for m in rows), padded=True,
                        padding_side=padding_side, min_cosine=-1.0, max_abs_diff=value)
             for (name, value), n, rows in zip(largest.items(), (len(queries), len(documents), len(queries)),
                                               (got_q, got_d, got_q))]
    return largest, cases


def _diff(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    if [g.shape for g in got] != [r.shape for r in ref]:
        return float("inf")
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
