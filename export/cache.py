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
from toolkit.export.steps import StepReporter, quiet_step
from toolkit.model_source import cache_entry, find_cached_artifact, locate_source
from toolkit.settings import ExportOptions

__all__ = ["CachedArtifact", "ensure_artifact"]


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
