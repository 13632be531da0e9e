"""``toolkit bench``: throughput in-process (vs sentence-transformers or transformers) or of a running server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli.app import app, int_list, one_line_errors
from toolkit.cli.sources import (
    PrecisionOption,
    RemoteCodeOption,
    RevisionOption,
    TargetOption,
    artifact_for,
    export_options_for_sources,
)
from toolkit.errors import ConfigError
from toolkit.model_source import require_extra

__all__ = ["bench"]


@app.command()
def bench(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", help="What to measure in-process, as `toolkit serve` takes it: an artifact (.onnx), a bundled card name, a Hub id or a local model directory (exported once into TOOLKIT_CACHE and reused); with --server, the server's model, for ratios to in-process calls")] = None,
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
    route: Annotated[str, typer.Option(help="With --server: the embeddings route to POST to (infinity: /embeddings)")] = "/v1/embeddings",
    openai_model: Annotated[str | None, typer.Option(help="With --server: send OpenAI's plain body {input, model: OPENAI_MODEL, encoding_format: base64} instead of the toolkit's (base64, truncate_prompt_tokens -1), for another project's server")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads for both engines [default: the cores available]")] = None,
    offline: Annotated[bool, typer.Option(help="Also time the whole corpus in one call (each engine batching it its own way)")] = True,
    images: Annotated[int, typer.Option(help="Measure the image tower (CLIP / SigLIP) on this many synthetic photos instead of text; --against MODEL_DIR compares with transformers' image processor + get_image_features")] = 0,
    precision: PrecisionOption = "fp32",
    target: TargetOption = "cpu",
    revision: RevisionOption = None,
    trust_remote_code: RemoteCodeOption = False,
) -> None:
    """Measure throughput, side by side with sentence-transformers, or drive a running server."""
    from toolkit import bench as bench_mod

    with one_line_errors():
        sizes = int_list(batch_sizes, "--batch-sizes")
        export_options = export_options_for_sources(precision, target, revision, trust_remote_code)
        if server:
            clients = int_list(concurrency, "--concurrency")
            artifact = None if model is None else artifact_for(model, export_options)  # the in-process baseline
            result = bench_mod.bench_server(server, artifact=artifact, corpus=corpus, api_key=api_key,
                                            concurrency=clients, requests=requests,
                                            inputs_per_request=inputs_per_request, threads=threads, route=route,
                                            body_fields=None if openai_model is None else
                                            {"model": openai_model, "encoding_format": "base64"})
        else:
            if model is None:
                raise ConfigError("give a MODEL to measure (an artifact, a bundled card name, a Hub id or a model "
                                  "directory), or --server URL")
            if against:
                require_extra("export", f"toolkit bench --against {against} (the PyTorch reference)")
            if images and plot:
                raise ConfigError("--plot draws text throughput; with --images use --json")
            artifact = artifact_for(model, export_options)
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


