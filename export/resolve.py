"""Step 1 of an export: find the model's files and resolve its card.

Order of precedence: CLI overrides > the model's own sentence-transformers
files > the bundled card in ``model_cards/`` > the architecture's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from toolkit.cards import ModelCard, PaddingSide, Pooling, find_card
from toolkit.errors import ConfigError
from toolkit.export.architectures import ARCHITECTURES, ArchSpec, get_arch
from toolkit.export.colvision import colvision_arch, is_colvision, read_colvision
from toolkit.export.heads import (
    ColVisionHead,
    Head,
    M3Head,
    MultiVectorHead,
    cross_encoder_activation,
    head_for,
    num_labels,
)
from toolkit.export.jina_v3 import convert, is_jina_v3, task_card_fields
from toolkit.export.late_interaction import is_multi_vector, read_multi_vector
from toolkit.export.model_files import ModelFiles, read_model_files
from toolkit.model_source import DEFAULT_MODEL, SourceKind, default_model_dir, locate_source
from toolkit.settings import ExportOptions

__all__ = ["DEFAULT_MODEL", "DenseSpec", "ResolvedModel", "default_model_dir", "resolve_model"]

_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers Dense module: ``activation(x @ W.T + b)``."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of _ACTIVATIONS
    key: str | None = None  # its weight is this tensor of ``path``'s weights file (Stanford ColBERT's linear.weight)


@dataclass(frozen=True)
class ResolvedModel:
    model_dir: Path
    transformer_dir: Path
    config: dict
    arch: ArchSpec
    card: ModelCard
    dense: tuple[DenseSpec, ...]
    st_layout: bool
    head: Head  # what follows the encoder (export.heads), chosen once from the card
    files: ModelFiles  # tokenizer.json, special tokens, chat template, model card: read once, here
    # LoRA adapters the checkpoint itself carries, as PEFT folders (jina-embeddings-v3's tasks): (name, folder)
    adapters: tuple[tuple[str, Path], ...] = ()


def _download(repo_id: str, card: ModelCard | None, revision: str | None = None) -> Path:
    """The Hub snapshot of ``repo_id``; the error says which of offline / no such model / gated it is."""
    what = f"'{card.name}' is a bundled card, but {repo_id}'s weights are not on this machine: " if card else ""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise ConfigError(f"{what}downloading '{repo_id}' needs huggingface_hub (pip install huggingface_hub); "
                          "or pass a local model directory") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except GatedRepoError:
        raise ConfigError(f"{what}'{repo_id}' is gated on the Hugging Face Hub: accept its terms on the model page "
                          "and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{what}'{repo_id}' does not exist on the Hugging Face Hub (or is private)") from None
    except Exception as exc:  # noqa: BLE001 - one boundary: the Hub client's network errors
        raise ConfigError(f"{what}the Hugging Face Hub is unreachable from here ({type(exc).__name__}), so "
                          f"'{repo_id}' cannot be downloaded; pass a local model directory") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _locate(model: str | None, revision: str | None = None) -> tuple[Path, ModelCard | None]:
    source = locate_source(model)
    match source.kind:
        case SourceKind.ARTIFACT:
            raise ConfigError(f"{model}: already an artifact; `toolkit export` takes a model directory, a bundled "
                              "card or a Hub id")
        case SourceKind.DIRECTORY:
            return source.path, None
        case SourceKind.CARD if source.card.name == DEFAULT_MODEL:
            return default_model_dir(), source.card
        case SourceKind.CARD | SourceKind.HUB:
            return _download(source.hub_id or source.text, source.card, revision), source.card
        case _:  # pragma: no cover - every member is listed above
            raise ConfigError(f"unknown source kind {source.kind}")


def _st_pooling(cfg: dict) -> Pooling | None:
    if cfg.get("pooling_mode_cls_token"):
        return Pooling.CLS
    if cfg.get("pooling_mode_mean_tokens"):
        return Pooling.MEAN
    if cfg.get("pooling_mode_lasttoken"):
        return Pooling.LAST_TOKEN
    mode = cfg.get("pooling_mode")
    return {"cls": Pooling.CLS, "mean": Pooling.MEAN, "lasttoken": Pooling.LAST_TOKEN}.get(mode)


def _dense(path: Path) -> DenseSpec:
    cfg = _read_json(path / "config.json")
    activation = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"{path.name}: activation '{activation}' is not one of: {', '.join(_ACTIVATIONS)}")
    return DenseSpec(path, int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)), activation)


def _read_sentence_transformers(model_dir: Path) -> tuple[dict, Path, tuple[DenseSpec, ...]]:
    """Card fields, the transformer folder and dense heads from a sentence-transformers layout."""
    modules = _read_json(model_dir / "modules.json")
    fields: dict = {"normalize": False}
    transformer_dir = model_dir
    dense: list[DenseSpec] = []
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        sub = model_dir / module.get("path", "")
        match kind:
            case "Transformer":
                transformer_dir = sub
                bert_cfg = sub / "sentence_bert_config.json"
                if not bert_cfg.is_file():
                    bert_cfg = model_dir / "sentence_bert_config.json"
                if bert_cfg.is_file():
                    if (max_len := _read_json(bert_cfg).get("max_seq_length")) is not None:
                        fields["max_seq_len"] = int(max_len)
                tok_cfg = sub / "tokenizer_config.json"
                if "max_seq_len" not in fields and tok_cfg.is_file():  # sentence-transformers 6 keeps it here
                    if (max_len := _read_json(tok_cfg).get("model_max_length")) and int(max_len) < 1_000_000:
                        fields["max_seq_len"] = int(max_len)
            case "Pooling":
                pool_cfg = _read_json(sub / "config.json")
                if (pooling := _st_pooling(pool_cfg)) is None:
                    raise ConfigError(f"{sub}: unsupported pooling config {pool_cfg}")
                fields["pooling"] = pooling
            case "Dense":
                dense.append(_dense(sub))
            case "Normalize":  # its folder may be missing (all-MiniLM-L6-v2): nothing to read
                fields["normalize"] = True
            case _:
                raise ConfigError(f"{model_dir}: sentence-transformers module '{kind}' is not supported")
    st_cfg = model_dir / "config_sentence_transformers.json"
    if st_cfg.is_file():
        data = _read_json(st_cfg)
        if prompts := data.get("prompts"):
            fields["prompts"] = {k: v for k, v in prompts.items() if isinstance(v, str)}
        if data.get("default_prompt_name"):
            fields["default_prompt_name"] = data["default_prompt_name"]
        if isinstance(data.get("activation_fn"), str):  # a CrossEncoder saved by sentence-transformers 6
            fields["activation"] = cross_encoder_activation({"sentence_transformers": {"activation_fn": data["activation_fn"]}})
    return fields, transformer_dir, tuple(dense)


def resolve_model(model: str | None, options: ExportOptions) -> ResolvedModel:
    """Locate ``model`` and merge its card; raise ConfigError when pooling stays unknown."""
    model_dir, card = _locate(model, options.revision)
    card = card or find_card(model_dir.name)
    st_layout = (model_dir / "modules.json").is_file()
    fields: dict = {}
    dense: tuple[DenseSpec, ...] = ()
    transformer_dir = model_dir
    multi_vector = read_multi_vector(model_dir) if is_multi_vector(model_dir) else None
    if multi_vector is not None:  # ColBERT (MultiVectorEncoder, PyLate v3, Stanford): export.late_interaction reads it
        fields, transformer_dir = dict(multi_vector.fields), multi_vector.transformer_dir
        dense = tuple(_dense(d) for d in multi_vector.dense_dirs)
        if multi_vector.inline_dense is not None:
            out_features, in_features = multi_vector.inline_dense
            dense = (DenseSpec(model_dir, in_features, out_features, False, "Identity", key="linear.weight"),)
        if (max_len := declared_length(transformer_dir)) is not None:
            fields["max_seq_len"] = max_len
    elif st_layout and not ((model_dir / "config.json").is_file()  # jina-v3's modules are its own code
                            and is_jina_v3(_read_json(model_dir / "config.json"))):
        fields, transformer_dir, dense = _read_sentence_transformers(model_dir)
    if not (transformer_dir / "config.json").is_file():
        raise ConfigError(f"{transformer_dir}: no config.json; is this a Hugging Face model directory?")
    config = _read_json(transformer_dir / "config.json")
    builtin_adapters: tuple[tuple[str, Path], ...] = ()
    if is_jina_v3(config):  # its XLM-RoBERTa read into transformers' layout, its task LoRAs into PEFT folders
        fields = {**fields, **task_card_fields(transformer_dir)}
        converted, adapters = convert(transformer_dir, Path(_scratch("jina-v3")))
        builtin_adapters = tuple(adapters)
        transformer_dir, st_layout = converted, False  # its sentence-transformers module is jina's code
        config = _read_json(transformer_dir / "config.json")
    colvision = None
    if is_colvision(config):  # ColQwen2, ColPali: a vision-language model (its vlm_config), a per-token projection
        config, *colvision = read_colvision(transformer_dir, config)
    arch = colvision_arch(config) or get_arch(str(config.get("model_type")), config)
    if arch.remote_code and not options.trust_remote_code:
        raise ConfigError(f"{transformer_dir}: '{arch.model_type}' ships its own modeling code (config auto_map); "
                          "pass --trust-remote-code to run it (only for a model you trust)")

    if arch.token_type_ids and "token_type_ids" not in _tokenizer_inputs(transformer_dir, arch.remote_code):
        arch = replace(arch, token_type_ids=False)  # transformers feeds none: the model reads zeros

    merged = msgspec.structs.asdict(card) if card else {"name": model_dir.name}
    for key, value in fields.items():  # the model's own files win over the bundled card
        if card is None or key not in ("prompts",) or value:
            merged[key] = value
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        merged.setdefault("pooling", Pooling.RANK)  # a cross-encoder (plain HF or sentence-transformers CrossEncoder)
    if config.get("is_causal") is False or (config.get("use_bidirectional_attention") and arch.bidirectional_mask):
        merged["bidirectional"] = True  # the config says the embedding model reads without a causal mask
    if merged.get("bidirectional") and not arch.bidirectional_mask:
        raise ConfigError(f"'{arch.model_type}' cannot be exported bidirectional here (only decoders: "
                          f"{', '.join(k for k, a in ARCHITECTURES.items() if a.bidirectional_mask)})")
    if card is None:
        bidirectional = bool(merged.get("bidirectional"))
        merged.setdefault("padding_side", PaddingSide.RIGHT if bidirectional else arch.padding_side)
        if arch.decoder:
            merged.setdefault("pooling", Pooling.MEAN if bidirectional else Pooling.LAST_TOKEN)
    tok_cfg = transformer_dir / "tokenizer_config.json"
    if card is None and tok_cfg.is_file() and (side := _read_json(tok_cfg).get("padding_side")):
        merged["padding_side"] = PaddingSide(side)
    if merged.get("max_seq_len") is None:  # where transformers' tokenizer (and CrossEncoder with it) truncates
        merged["max_seq_len"] = min(_config_max_len(config, arch), declared_length(transformer_dir) or 1_000_000)
    if options.pooling is not None:
        if arch.pooling is not None and Pooling(options.pooling) != arch.pooling:
            raise ConfigError(f"'{arch.model_type}' pools by its own rule ({arch.pooling.value}); drop --pooling")
        merged["pooling"] = options.pooling
    if arch.pooling is not None and colvision is None:
        merged["pooling"] = arch.pooling
    if options.normalize is not None:
        merged["normalize"] = options.normalize
    if options.max_seq_len is not None:
        merged["max_seq_len"] = options.max_seq_len
    if options.matryoshka_dims:
        merged["matryoshka_dims"] = sorted(set(options.matryoshka_dims))
    if options.matryoshka_any:
        merged["matryoshka_any"] = True
    if merged.get("pooling") is None and multi_vector is None and colvision is None:  # late interaction pools nothing
        raise ConfigError(
            f"{model_dir}: cannot tell the pooling (no sentence-transformers files, no bundled card); "
            "pass --pooling cls|mean|last_token|splade|rank"
        )
    if merged.get("instruction_end_tokens") and Pooling(merged["pooling"]) != Pooling.MEAN:
        raise ConfigError("instruction_end_tokens (skip the instruction when pooling) needs mean pooling, got "
                          f"{Pooling(merged['pooling']).value}")
    if merged.get("late_interaction") and multi_vector is None and colvision is None:
        raise ConfigError(f"{model_dir}: its card '{merged['name']}' is a late-interaction model, but the folder is "
                          "not a ColBERT (MultiVectorEncoder, PyLate, Stanford) or ColVision (ColQwen2, ColPali) "
                          "checkpoint")
    if multi_vector is not None:
        head: Head = MultiVectorHead(multi_vector.late)
    elif colvision is not None:
        head = ColVisionHead(colvision[1], colvision[0])
    else:
        head = head_for(Pooling(merged["pooling"]), image_tower=arch.image_tower,
                        vision_language=arch.vision_language, labels=num_labels(config))
    m3 = next((d for d in (transformer_dir, model_dir) if all((d / f).is_file() for f in M3Head.FILES)), None)
    if m3 is not None and head.name == "dense":  # FlagEmbedding's layout: BGE-M3's sparse and ColBERT layers too
        head = M3Head(m3)
    if head.needs_arch and not getattr(arch, head.needs_arch):
        raise ConfigError(f"the {head.name} head needs what '{arch.model_type}' does not have here ({head.needs_arch})")
    merged = head.complete(merged, options.normalize, config)
    if not head.dense_layers:
        dense = ()
    resolved_card = msgspec.convert(merged, ModelCard, from_attributes=True)
    files = read_model_files(model_dir, transformer_dir, name=resolved_card.name, source=resolved_card.source)
    if multi_vector is not None and multi_vector.tokenizer_json is not None:  # PyLate's prefixes registered
        files = replace(files, tokenizer_json=multi_vector.tokenizer_json)
    return ResolvedModel(model_dir, transformer_dir, config, arch, resolved_card, dense, st_layout, head, files,
                         builtin_adapters)


def _scratch(label: str) -> str:
    """A folder for a checkpoint converted at export, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=f"toolkit-{label}-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def declared_length(folder: Path) -> int | None:
    """The tokenizer's ``model_max_length`` where it declares one (transformers' "no limit" is a huge number)."""
    tok_cfg = folder / "tokenizer_config.json"
    value = _read_json(tok_cfg).get("model_max_length") if tok_cfg.is_file() else None
    return int(value) if isinstance(value, (int, float)) and 0 < value < 1_000_000 else None


def _tokenizer_inputs(folder: Path, trust_remote_code: bool) -> tuple[str, ...]:
    """What the model's own tokenizer returns (``model_input_names``, as transformers loads it): token type ids are
    fed exactly when it returns them. A folder whose tokenizer transformers cannot load keeps the architecture's."""
    try:
        from transformers import AutoTokenizer

        names = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code).model_input_names
    except Exception:  # noqa: BLE001 - no loadable tokenizer config: the architecture's inputs stand
        return ("token_type_ids",)
    return tuple(names)


def _config_max_len(config: dict, arch: ArchSpec) -> int:
    text = config.get("text_config") or {}  # vision-language configs keep the language model's facts there
    value = int(config.get("max_position_embeddings") or text.get("max_position_embeddings") or 512) - arch.position_offset
    return min(value, 8192)
