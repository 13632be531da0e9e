"""Artifacts every node can read: a URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``: what pyarrow's
filesystems read) copied once per node into the cache, checked before it opens.

An artifact is its ``.onnx`` file and the files beside it that share its name (``model.onnx.data``, the image
tower ``model.image.onnx`` and its data). The copy lands in ``TOOLKIT_CACHE/remote/<hash of the URI>/``; each
file is written under a temporary name and renamed when whole, so replicas of one node that start together
never open a half-copied file, and a node that has the copy (same names, same sizes) copies nothing. Before it
is used the copy must match the source's sizes and carry a toolkit manifest.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from toolkit.errors import ConfigError
from toolkit.manifest import MANIFEST_KEY
from toolkit.model_source import cache_root
from toolkit.runtime.artifact import read_metadata

__all__ = ["is_uri", "local_path", "localize"]

_CHUNK = 8 * 1024 * 1024


def is_uri(model: str) -> bool:
    return "://" in model


def local_path(model: str) -> Path:
    """An artifact path as it is, or a URI's copy in this node's cache (``localize``)."""
    return localize(model) if is_uri(model) else Path(model)


def _files(fs, path: str) -> dict[str, int]:
    """{name: size} of the artifact at ``path`` and the files beside it that belong to it."""
    from pyarrow import fs as pafs

    folder, name = posixpath.split(path)
    stem = name.removesuffix(".onnx")
    listed = {posixpath.basename(i.path): i.size for i in fs.get_file_info(pafs.FileSelector(folder or "/"))
              if i.type == pafs.FileType.File}
    if name not in listed:
        others = sorted(n for n in listed if n.endswith(".onnx"))
        raise ConfigError(f"no such artifact file: {path} (in {folder or '/'}: {', '.join(others) or 'no .onnx file'})")
    files = {n: size for n, size in listed.items() if n == name or n.startswith(stem + ".")}
    return files


def localize(uri: str) -> Path:
    """The local path of the artifact at ``uri``, copied into the cache if this node does not have it yet.

    ConfigError (one line) for a URI pyarrow cannot read, a missing file, or a copy that does not check out.
    """
    try:
        from pyarrow import fs as pafs
    except ImportError:
        raise ConfigError(f"{uri}: artifacts by URI need pyarrow: pip install 'onnx-embed-toolkit[serve]'") from None
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        files = _files(fs, path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError, ...) at this one boundary
        raise ConfigError(f"cannot read {uri}: {exc}") from None
    target = cache_root() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    folder = posixpath.dirname(path)
    for name, size in sorted(files.items()):
        local = target / name
        if local.is_file() and local.stat().st_size == size:
            continue  # copied before (by this replica or another on this node)
        partial = target / f".{name}.{os.getpid()}.partial"
        try:
            with fs.open_input_stream(posixpath.join(folder, name)) as source, open(partial, "wb") as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
            os.replace(partial, local)
        except Exception as exc:  # noqa: BLE001 - pyarrow's and the disk's errors, at this one boundary
            partial.unlink(missing_ok=True)
            raise ConfigError(f"cannot copy {uri} ({name}) into {target}: {exc}") from None
    artifact = target / posixpath.basename(path)
    wrong = [n for n, size in files.items() if (target / n).stat().st_size != size]
    if wrong or MANIFEST_KEY not in read_metadata(artifact):
        raise ConfigError(f"{uri}: the copy in {target} does not check out "
                          f"({'sizes differ: ' + ', '.join(wrong) if wrong else 'no toolkit manifest'})")
    return artifact
