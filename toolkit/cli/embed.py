"""``toolkit embed``: a whole dataset into Parquet, in this process or on Ray Data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from toolkit.cli.app import app, console, one_line_errors, parse_device
from toolkit.cli.sources import (
    PrecisionOption,
    RemoteCodeOption,
    RevisionOption,
    TargetOption,
    artifact_for,
    export_options_for_sources,
)
from toolkit.errors import ConfigError

__all__ = ["embed"]


@app.command()
def embed(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="An artifact (.onnx), a bundled card name, a Hub id or a local model directory (exported once into TOOLKIT_CACHE and reused)")],
    inputs: Annotated[str, typer.Argument(metavar="INPUT", help="Parquet, JSON Lines, CSV or text (one text a line): a file, a directory or a quoted glob")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory of Parquet parts (id, embedding | indices, values | label, probabilities)")],
    text_column: Annotated[str | None, typer.Option(help="Column (field) holding the text [default: text]; given with --image-column (vision-language artifacts), each row's image and text are one item")] = None,
    id_column: Annotated[str | None, typer.Option(help="Column kept as the row id [default: the row number, as column 'row']")] = None,
    image_column: Annotated[str | None, typer.Option(help="Artifacts that read images (CLIP, SigLIP, vision-language): embed this column of image paths or encoded bytes instead of text")] = None,
    input_format: Annotated[str | None, typer.Option(help="parquet | jsonl | csv | text [default: from the extension]")] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka size to write [default: the model's]")] = None,
    prompt_name: Annotated[str | None, typer.Option(help="Card prompt to prepend, e.g. query / document [default: the card's default]")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Write raw (un-normalized) vectors")] = False,
    embedding_type: Annotated[str, typer.Option(help="float | int8 | uint8 | binary | ubinary (Cohere's types)")] = "float",
    adapter: Annotated[str | None, typer.Option(help="The artifact's LoRA adapter to embed with (`toolkit inspect` lists them) [default: the base model]")] = None,
    task: Annotated[str | None, typer.Option(help="The runtime's task to run: embed, token_embed, embed_sparse, classify, ... [default: embed; embed_sparse for a sparse artifact, classify (label, probabilities) for a classifier]")] = None,
    truncate: Annotated[bool, typer.Option(help="Cut texts past the model's maximum instead of refusing them")] = False,
    on_error: Annotated[str, typer.Option(help="stop: the first bad row (empty, missing, too long) stops the run, naming its id; skip: record it in OUTPUT/_skipped.jsonl and go on")] = "stop",
    rows_per_part: Annotated[int, typer.Option(help="Rows per Parquet part (the unit a crash can lose)")] = 50_000,
    window: Annotated[int, typer.Option(help="Rows tokenized and length-sorted together (and Ray's batch size)")] = 2048,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same OUTPUT (finished parts are kept)")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace what OUTPUT holds")] = False,
    engine: Annotated[str, typer.Option(help="local: this process | ray: Ray Data actors (the [ray] extra)")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster ('auto' or ray://HOST:PORT) [default: start a local Ray sized to this machine]")] = None,
    actors: Annotated[int | None, typer.Option(help="--engine ray: embedding actors [default: the cluster's GPUs / --gpus-per-actor, or (CPUs - 1) / --cpus-per-actor: one CPU stays free for Ray's reads and writes]")] = None,
    cpus_per_actor: Annotated[float, typer.Option(help="--engine ray: CPUs each actor reserves (its onnxruntime threads unless --threads)")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(help="--engine ray: GPUs per actor (0: CPU actors)")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (--engine ray: per actor) [default: the cores available; per Ray actor, --cpus-per-actor]")] = None,
    precision: PrecisionOption = "fp32",
    target: TargetOption = "cpu",
    revision: RevisionOption = None,
    trust_remote_code: RemoteCodeOption = False,
) -> None:
    """Embed a whole dataset into Parquet: streamed, resumable, in this process or on Ray Data."""
    from toolkit import bulk

    with one_line_errors():
        dev = parse_device(device)
        options = bulk.BulkOptions(text_column=text_column or "text", id_column=id_column, image_column=image_column,
                                   with_text=image_column is not None and text_column is not None,
                                   input_format=input_format, dimensions=dimensions, prompt_name=prompt_name,
                                   normalize=False if no_normalize else None, embedding_type=embedding_type,
                                   truncate=truncate, on_error=on_error, rows_per_part=rows_per_part, window=window,
                                   task=task, adapter=adapter)
        options.validate()
        artifact = artifact_for(model, export_options_for_sources(precision, target, revision, trust_remote_code))
        match engine:
            case "local":
                try:
                    summary = _embed_local(artifact, inputs, output, options, resume=resume, overwrite=overwrite,
                                           device=dev, threads=threads)
                except KeyboardInterrupt:
                    _interrupted(output)
            case "ray":
                if resume:
                    raise ConfigError("--resume is for --engine local; Ray retries failed tasks itself")
                with console.status("Embedding on Ray Data..."):
                    summary = bulk.embed_with_ray(artifact, inputs, output, options, address=address, actors=actors,
                                                  num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, threads=threads,
                                                  overwrite=overwrite)
            case _:
                raise ConfigError(f"--engine must be one of: local, ray (got {engine})")
    tokens = f", {summary.tokens:,} tokens ({summary.tokens / summary.seconds:,.0f}/s)" if summary.tokens else ""
    resumed = f"; {summary.resumed_rows:,} rows were done before (--resume)" if summary.resumed_rows else ""
    skipped = f"; {summary.skipped:,} skipped (listed in {output / bulk.SKIPPED_FILE})" if summary.skipped else ""
    written = f"{summary.rows:,} rows in {summary.parts} part(s)"
    if summary.resumed_parts:  # the parts this run wrote, and the ones an earlier run had
        written = (f"{summary.resumed_rows + summary.rows:,} rows in {summary.parts} part(s) "
                   f"({summary.parts - summary.resumed_parts} new, {summary.resumed_parts} already done); "
                   f"this run: {summary.rows:,} rows")
    console.print(f"[bold]{escape(str(summary.output))}[/]: {written}, {summary.seconds:.1f} s "
                  f"({summary.rows_per_s:,.0f} rows/s){tokens}{skipped}{resumed}", highlight=False)


def _interrupted(output: Path) -> NoReturn:
    """Ctrl-C: one line saying what is saved and how to go on; exit 130 (the shell's code for SIGINT)."""
    from toolkit.bulk import recorded

    rows, parts = recorded(output)
    if parts:
        said = (f"{rows:,} rows in {parts} part(s) are saved in {output}; run the same command with --resume to "
                "continue where it stopped")
    else:
        said = f"no part was finished, so {output} keeps nothing; run the same command again to start over"
    console.print(f"[bold yellow]interrupted:[/] {escape(said)}", highlight=False)
    raise typer.Exit(130)


def _embed_local(artifact: Path, inputs: str, output: Path, options, *, resume: bool, overwrite: bool, device,
                 threads: int | None):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from toolkit import bulk
    from toolkit.runtime import Embedder

    embedder = Embedder(artifact, device=device, intra_op_threads=threads, adapter=options.adapter)
    columns = [TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=False, refresh_per_second=4)
    task = progress.add_task("embed", total=None, rate="")
    started = time.perf_counter()
    totals = {"rows": 0, "tokens": 0, "skipped": 0}
    try:
        def on_start(total: int | None, done: int) -> None:  # the bar appears once the output is accepted
            progress.update(task, total=total, completed=done)
            progress.start()

        def on_progress(rows: int, tokens: int, skipped: int) -> None:
            totals["rows"] += rows
            totals["tokens"] += tokens
            totals["skipped"] += skipped
            elapsed = max(time.perf_counter() - started, 1e-9)
            rate = f"{totals['rows'] / elapsed:,.0f} rows/s, {totals['tokens'] / elapsed:,.0f} tokens/s"
            if totals["skipped"]:
                rate += f", {totals['skipped']:,} skipped"
            progress.update(task, advance=rows, rate=rate)

        return bulk.embed_files(embedder, inputs, output, options, resume=resume, overwrite=overwrite,
                                on_progress=on_progress, on_start=on_start)
    finally:
        if progress.live.is_started:  # stopping one never started prints an empty line before the error
            progress.stop()


