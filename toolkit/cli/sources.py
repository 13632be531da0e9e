"""MODEL arguments as artifacts: an artifact as is, a card / Hub id / directory through the export cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from toolkit.cli.app import console, parse_precision_target, step
from toolkit.model_source import (
    SourceKind,
    cache_entry,
    cache_root,
    find_cached_artifact,
    locate_source,
    require_extra,
)

__all__ = ["PrecisionOption", "RemoteCodeOption", "RevisionOption", "TargetOption", "artifact_for", "export_options_for_sources"]


# the export options of `toolkit serve`, `toolkit embed` and `toolkit bench`, for a MODEL that is not an artifact yet
PrecisionOption = Annotated[str, typer.Option(help="For a MODEL that is exported first: fp32 | fp16 | int8 (see `toolkit export --help`)")]
TargetOption = Annotated[str, typer.Option(help="For a MODEL that is exported first: cpu | cuda | tensorrt")]
RevisionOption = Annotated[str | None, typer.Option(help="For a Hub id: the branch, tag or commit to export [default: the default branch]")]
RemoteCodeOption = Annotated[bool, typer.Option(help="For a MODEL that is exported first: run the model folder's own code")]


def export_options_for_sources(precision: str, target: str, revision: str | None, trust_remote_code: bool):
    from toolkit.settings import ExportOptions

    prec, tgt = parse_precision_target(precision, target)
    return ExportOptions(precision=prec, target=tgt, revision=revision, trust_remote_code=trust_remote_code)


def artifact_for(model: str | None, options) -> Path:
    """MODEL as an artifact path: itself, its cached export (said so), or exported into the cache now."""
    source = locate_source(model)
    cached = find_cached_artifact(source, options)
    if cached is not None:
        if source.kind is not SourceKind.ARTIFACT:
            console.print(f"reusing the export of {escape(source.text)} in {escape(str(cached))} (exported before; "
                          "`toolkit inspect --cache` lists the cache)", highlight=False)
        return cached
    entry = cache_entry(source, options)
    require_extra("export", f"{source.text} is {source.label} with no artifact in the cache ({cache_root()}) yet; "
                            "exporting it")
    console.print(f"{escape(source.text)}: exporting once into {escape(str(entry.folder))} (later starts reuse it)",
                  highlight=False)
    from toolkit.export.cache import ensure_artifact

    return ensure_artifact(model, options, step=step).path


