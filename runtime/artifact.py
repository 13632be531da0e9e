"""Reading an artifact: the session, its manifest and its tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ConfigError
from toolkit.manifest import MANIFEST_KEY, MODEL_CARD_KEY, TOKENIZER_KEY, Manifest, decode_manifest
from toolkit.model_source import cache_root, find_cached_artifact, install_hint, locate_source
from toolkit.runtime.session import OrtSession
from toolkit.settings import RuntimeOptions

__all__ = ["Artifact", "adapter_path", "companion_files", "image_tower_path", "open_artifact", "read_metadata",
           "resolve_artifact_path"]


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


def adapter_path(text_path: Path, adapter: str) -> Path:
    """Where the artifact's LoRA adapter ``adapter`` lives: ``name.onnx`` -> ``name.adapter.<adapter>.onnx_adapter``
    (onnxruntime's adapter format)."""
    return text_path.with_name(f"{text_path.stem}.adapter.{adapter}.onnx_adapter")


def companion_files(text_path: Path, manifest: Manifest) -> list[Path]:
    """The files an artifact reads beside itself: its image tower, its adapters' parameters."""
    tower = image_tower_path(text_path)
    return ([tower] if tower.is_file() else []) + [adapter_path(text_path, a.name) for a in manifest.adapters]


def resolve_artifact_path(model: str | os.PathLike) -> Path:
    """An artifact file, or the cached artifact of a card name / Hub id / model directory exported before.

    Never exports (that needs torch): a source with no cached artifact is a ConfigError naming the cache
    and the way to fill it.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return path
    source = locate_source(model if isinstance(model, str) else path)
    cached = find_cached_artifact(source)
    if cached is None:
        raise ConfigError(f"'{source.text}' is {source.label} with no artifact in the cache ({cache_root()}) "
                          f"yet: `toolkit serve {source.text}` exports it there once, or in Python "
                          f"Embedder(ensure_artifact('{source.text}')) with ensure_artifact from toolkit.export "
                          f"(both need the [export] extra: {install_hint('export')}); or open an "
                          f"artifact written by `toolkit export {source.text} -o model.onnx`")
    return cached


log = logging.getLogger("toolkit.runtime")


def open_artifact(path: str | os.PathLike, options: RuntimeOptions | None = None) -> Artifact:
    """Load ``path`` (see ``resolve_artifact_path``); every failure is one readable ConfigError line."""
    path = resolve_artifact_path(path)
    session = OrtSession(path, options)
    meta = session.metadata
    if MANIFEST_KEY not in meta or TOKENIZER_KEY not in meta:
        raise ConfigError(f"{path}: not a toolkit artifact (no manifest); create one with `toolkit export`")
    manifest = decode_manifest(meta[MANIFEST_KEY], source=str(path))
    if manifest.tower != "text":
        handle = path.with_name(path.name.removesuffix(f".{manifest.tower}.onnx") + ".onnx")
        raise ConfigError(f"{path} is the {manifest.tower} tower of {handle.name}: open {handle} (it opens both towers)")
    _check_int8_kernels(path, manifest)
    return Artifact(path, session, manifest, meta[TOKENIZER_KEY], meta.get(MODEL_CARD_KEY, ""))


def _check_int8_kernels(path: Path, manifest) -> None:
    """An int8 artifact gated on a VNNI CPU, served on one without VNNI (or the reverse), runs other int8 kernels
    than its accuracy gate measured (AVX2's u8s8 kernel saturates 16-bit sums where VNNI's does not): say so.
    Only the ``s8`` form differs: 7-bit and uint8 weights come out the same on both kernels (tests/test_int8_forms.py);
    artifacts from before the forms are ``s8``."""
    gated = manifest.optimization.get("int8_gated_on")
    if manifest.precision != "int8" or not isinstance(gated, str) or manifest.target != "cpu":
        return
    if manifest.optimization.get("int8_form", "s8") != "s8":
        return
    from toolkit.cpu import describe, has_vnni

    here = describe()
    if has_vnni(gated) != has_vnni(here):
        log.warning("%s: its int8 accuracy gate ran on %s; this CPU, %s, runs other int8 kernels, so its accuracy "
                    "was not measured here (re-export on this kind of CPU to gate it here)", path.name, gated, here)


def _varint(stream) -> int | None:
    """A protobuf varint from ``stream``; None at its end."""
    value = shift = 0
    while byte := stream.read(1):
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    return None


def _fields(stream):
    """(field number, value) of a protobuf message's top-level fields: bytes for length-delimited ones (field 14
    of a ModelProto, its ``metadata_props``, read; the others, the graph among them, skipped by seeking)."""
    while (key := _varint(stream)) is not None:
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, _varint(stream)
        elif wire in (1, 5):
            stream.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            size = _varint(stream) or 0
            if field in (1, 2, 14):
                yield field, stream.read(size)
            else:
                stream.seek(size, 1)
        else:
            raise ValueError(f"wire type {wire}")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (the manifest, card and tokenizer) without opening a session: the graph
    is skipped, not parsed. ConfigError where the file is not an ONNX model."""
    import io

    meta: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for field, value in _fields(f):
                if field == 14:
                    entry = dict(_fields(io.BytesIO(value)))
                    meta[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not an ONNX model ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return meta
