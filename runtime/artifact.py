"""Reading an artifact: the session, its manifest and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ConfigError
from toolkit.manifest import MANIFEST_KEY, MODEL_CARD_KEY, TOKENIZER_KEY, Manifest, decode_manifest
from toolkit.runtime.session import OrtSession
from toolkit.settings import RuntimeOptions

__all__ = ["Artifact", "image_tower_path", "open_artifact"]


@dataclass
class Artifact:
    path: Path
    session: OrtSession
    manifest: Manifest
    tokenizer_json: str
    model_card: str


def image_tower_path(text_path: Path) -> Path:
    """Where the image tower of the artifact ``text_path`` lives: ``name.onnx`` -> ``name.image.onnx``."""
    return text_path.with_name(text_path.stem + ".image.onnx")


def open_artifact(path: str | Path, options: RuntimeOptions | None = None) -> Artifact:
    """Load ``path``; every failure is one readable ConfigError line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such artifact file")
    session = OrtSession(path, options)
    meta = session.metadata
    if MANIFEST_KEY not in meta or TOKENIZER_KEY not in meta:
        raise ConfigError(f"{path}: not a toolkit artifact (no manifest); create one with `toolkit export`")
    manifest = decode_manifest(meta[MANIFEST_KEY], source=str(path))
    if manifest.tower != "text":
        handle = path.with_name(path.name.removesuffix(f".{manifest.tower}.onnx") + ".onnx")
        raise ConfigError(f"{path} is the {manifest.tower} tower of {handle.name}: open {handle} (it opens both towers)")
    return Artifact(path, session, manifest, meta[TOKENIZER_KEY], meta.get(MODEL_CARD_KEY, ""))
