"""``toolkit export``: a model to ONE verified artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from toolkit.cli.app import app, console, int_list, one_line_errors, parse_precision_target, step
from toolkit.errors import ConfigError
from toolkit.model_source import require_extra

__all__ = ["export"]


@app.command()
def export(
    model: Annotated[str | None, typer.Argument(help="Hub id, local model directory or bundled card name (default: all-MiniLM-L6-v2).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Artifact path [default: <model>[-<precision>].onnx]")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (cuda/tensorrt) | int8 (cpu)")] = "fp32",
    target: Annotated[str, typer.Option(help="cpu | cuda | tensorrt: which fusions and precision suit it")] = "cpu",
    opset: Annotated[int, typer.Option(help="ONNX opset, 14-21 (the fused CPU form is exported at 17)")] = 18,
    max_seq_len: Annotated[int | None, typer.Option(help="Override the card's max tokens per input")] = None,
    pooling: Annotated[str | None, typer.Option(help="Override pooling: cls | mean | last_token | splade | rank (a cross-encoder; detected from *ForSequenceClassification)")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Do not L2-normalize sentence_embedding")] = False,
    matryoshka_dims: Annotated[str | None, typer.Option(help="Matryoshka heads to fuse, e.g. 64,128,256")] = None,
    matryoshka: Annotated[str | None, typer.Option(help="'any': accept any dimensions 1..dim at run time")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run model code from the model's folder / Hub repo")] = False,
    skip_parity: Annotated[bool, typer.Option(help="Skip verification (recorded in the manifest as UNVERIFIED)")] = False,
    allow_low_accuracy: Annotated[bool, typer.Option(help="Write an int8 artifact that misses its accuracy gate")] = False,
    int8_form: Annotated[str, typer.Option(help="int8: auto (search each form, keep the fastest that passes the gate on this CPU) | s8 (uint8 x int8, VNNI's kernel) | s8-7bit (7-bit weights: AVX2's kernel cannot saturate) | u8 (uint8 x uint8)")] = "auto",
    no_optimize: Annotated[bool, typer.Option("--no-optimize", help="Skip onnxruntime transformer fusions")] = False,
    force: Annotated[bool, typer.Option("--force", help="Export again even where the cache holds this model exported with the same options and toolkit version and code (it is reused by default)")] = False,
    fp32_embedding_table: Annotated[bool, typer.Option("--fp32-embedding-table", help="CPU: keep the word-embedding table in fp32 (default: fp16 lookup, cast to fp32; cosine moves ~1e-7, -22 MiB for MiniLM)")] = False,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="A PEFT LoRA adapter of this model as NAME=DIR (repeat it): the artifact gets LoRA slots, each adapter its own .onnx_adapter file beside it, verified against PEFT's model; served under its own name, picked per request [default: none]")] = None,
) -> None:
    """Export MODEL to ONE self-contained ONNX artifact, verified against PyTorch."""
    from toolkit.cards import parse_pooling
    from toolkit.settings import ExportOptions

    with one_line_errors():
        require_extra("export", "toolkit export")
        prec, tgt = parse_precision_target(precision, target)
        if not 14 <= opset <= 21:  # Attention-era operators need 14+; onnxruntime 1.20 runs up to 21
            raise ConfigError(f"--opset must be between 14 and 21, got {opset}")
        if matryoshka not in (None, "any"):
            raise ConfigError(f"--matryoshka accepts only 'any', got '{matryoshka}'")
        options = ExportOptions(
            output=output, precision=prec, target=tgt, opset=opset, max_seq_len=max_seq_len,
            pooling=parse_pooling(pooling) if pooling else None, normalize=False if no_normalize else None,
            matryoshka_dims=int_list(matryoshka_dims, "--matryoshka-dims"), matryoshka_any=matryoshka == "any",
            trust_remote_code=trust_remote_code, skip_parity=skip_parity, allow_low_accuracy=allow_low_accuracy,
            optimize=not no_optimize, fp16_embedding_table=not fp32_embedding_table,
            int8_form=None if int8_form == "auto" else int8_form,
            adapters=tuple(adapter or ()),
        )
        for text in options.adapters:  # the form first, before any model is read
            from toolkit.export.adapters import parse_adapter

            parse_adapter(text)
        if skip_parity:
            console.print("[bold yellow]WARNING: --skip-parity: the artifact will NOT be checked against PyTorch; "
                          "the manifest records it as unverified.[/]")
        from toolkit.export.cache import export_to

        result, reused = export_to(model, options, step=step, force=force)
    parity = result.manifest.parity
    if parity.max_abs_diff and not parity.min_cosine:  # a cross-encoder's scores
        figure = f"max abs difference vs {parity.reference} {max(parity.max_abs_diff.values()):.2e}"
    else:
        figure = f"min cosine vs {parity.reference} {min(parity.min_cosine.values()) if parity.min_cosine else float('nan'):.7f}"
    if (image := result.manifest.image) is not None and not image.parity.skipped:
        figure += (f"; image tower ({image.parity.reference}) {image.parity.min_cosine['image_embedding']:.7f}, "
                   f"pixels within {image.parity.max_abs_diff['pixel_values']:.1e}")
    for spec in result.manifest.adapters:
        figure += f"; adapter {spec.name} (r={spec.rank}) {min(spec.min_cosine.values()) if spec.min_cosine else float('nan'):.7f}"
    console.print(f"[bold]{escape(str(result.path))}[/]: {result.size_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s; {figure}"
                  + (f", top-10 overlap vs fp32 {parity.retrieval_top10_overlap:.3f}" if parity.retrieval_top10_overlap is not None else "")
                  + ("; reused the verified export in the cache (same model, options and toolkit; --force exports "
                     "again)" if reused else ""))


