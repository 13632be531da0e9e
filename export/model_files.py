"""The model folder's tokenizer-side files, read once (by ``resolve_model``) and carried on the resolved model.

``tokenizer.json`` (converted from a slow tokenizer when the folder has none), the special tokens of
``tokenizer_config.json``, the chat template (``chat_template.jinja`` or ``tokenizer_config.json``'s, its
``default`` when named) and the model card (``README.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import ExportError

__all__ = ["ModelFiles", "read_model_files"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ModelFiles:
    tokenizer_json: str
    model_card: str
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # name -> token text, e.g. pad_token -> [PAD]


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_json(folders: tuple[Path, ...]) -> str:
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            return (folder / "tokenizer.json").read_text()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[0])
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{folders[0]}: no tokenizer.json and no fast tokenizer to convert")
    return tok.backend_tokenizer.to_str()


def _chat_template(folders: tuple[Path, ...]) -> str | None:
    for folder in folders:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text()
        template = _json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def read_model_files(model_dir: Path, transformer_dir: Path, *, name: str, source: str | None) -> ModelFiles:
    """The tokenizer side of a model folder; ``transformer_dir`` first (sentence-transformers layouts)."""
    folders = (transformer_dir, model_dir)
    config = _json(transformer_dir / "tokenizer_config.json")
    specials = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    card = next(((f / "README.md").read_text(errors="replace") for f in (model_dir, transformer_dir)
                 if (f / "README.md").is_file()), json.dumps({"name": name, "source": source}))
    return ModelFiles(_tokenizer_json(folders), card, _chat_template(folders), specials)
