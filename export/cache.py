"""``ensure_artifact``: a MODEL (card, Hub id, directory or artifact) as an artifact path, exported once.

The cache folders are named by ``toolkit.model_source.cache_entry``; this module fills them. An
export is written into a temporary folder beside its entry and renamed into place when verified,
so a crash or a second process exporting the same model never leaves half an artifact behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from toolkit.export.pipeline import export_model
from toolkit.export.precision import PrecisionPlan
from toolkit.export.steps import ExportResult, StepReporter, default_output, quiet_step
from toolkit.model_source import SourceKind, cache_entry, find_cached_artifact, locate_source
from toolkit.settings import ExportOptions

__all__ = ["CachedArtifact", "ensure_artifact", "export_to"]


@dataclass(frozen=True)
class CachedArtifact:
    path: Path
    reused: bool  # found in the cache (or given as an artifact): nothing was exported

    def __fspath__(self) -> str:  # Embedder(ensure_artifact(...)) and open() take it as the artifact's path
        return str(self.path)


def ensure_artifact(model: str | Path | None, options: ExportOptions | None = None, *,
                    step: StepReporter = quiet_step) -> CachedArtifact:
    """The artifact for ``model``, exported into ``TOOLKIT_CACHE`` on first use (``options.output`` is ignored).

    Raises ConfigError for a source that names nothing, and what ``export_model`` raises.
    """
    options = options or ExportOptions()
    source = locate_source(model)
    cached = find_cached_artifact(source, options)
    if cached is not None:
        return CachedArtifact(cached, reused=True)
    entry = cache_entry(source, options)
    entry.folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.folder.name}.", dir=entry.folder.parent))
    try:
        export_model(None if model is None else str(model),
                     msgspec.structs.replace(options, output=staging / entry.artifact.name), step=step)
        (staging / "source.json").write_text(json.dumps({"model": source.text, **entry.key}, indent=2))
        try:
            os.rename(staging, entry.folder)
        except OSError:  # another process finished the same export first, or a stale partial folder is there
            if not entry.complete:
                shutil.rmtree(entry.folder, ignore_errors=True)
                os.rename(staging, entry.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CachedArtifact(entry.artifact, reused=False)


def export_to(model: str | None, options: ExportOptions, *, step: StepReporter = quiet_step,
              force: bool = False) -> tuple[ExportResult, bool]:
    """``toolkit export``: (the artifact at ``options.output``, whether it was reused). A model exported before with
    the same source, options and toolkit (version and code: the cache's key, ``cache_entry``) is not exported again: its
    verified artifact is linked (or copied) from the cache, beside it the files it reads (image tower, adapters). Otherwise it
    is exported into the cache first (``ensure_artifact``), so ``serve`` / ``embed`` / ``Embedder`` of the same
    model find it too. ``force``: export again, replacing the cache's copy."""
    import time

    from toolkit.manifest import MANIFEST_KEY, decode_manifest
    from toolkit.runtime.artifact import companion_files, read_metadata

    started = time.perf_counter()
    source = locate_source(model)
    if source.kind is SourceKind.ARTIFACT:  # nothing to export: export_model says so in its words
        return export_model(model, options, step=step), False
    if force:
        shutil.rmtree(cache_entry(source, options).folder, ignore_errors=True)
    cached = ensure_artifact(model, options, step=step)
    manifest = decode_manifest(read_metadata(cached.path)[MANIFEST_KEY], source=str(cached.path))
    out = Path(options.output) if options.output else default_output(manifest.card.name, PrecisionPlan.of(options.precision))
    out.parent.mkdir(parents=True, exist_ok=True)
    with step(f"Writing {out.name}" + (" (the verified export in the cache: same model, options and toolkit)"
                                       if cached.reused else "")):
        for src in companion_files(cached.path, manifest):  # beside it first: a reader of ``out`` finds them
            _place(src, out.with_name(out.stem + src.name.removeprefix(cached.path.stem)))
        _place(cached.path, out)
    return ExportResult(out, manifest, time.perf_counter() - started, out.stat().st_size), cached.reused


def _place(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``: a hard link where the file system allows one (an 8 GB artifact is not
    written twice), else a copy; written beside ``dst`` and renamed, so a reader never sees half of it."""
    if dst.resolve() == src.resolve():
        return
    staging = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(src, staging)
    except OSError:
        shutil.copyfile(src, staging)
    os.replace(staging, dst)
