"""``toolkit bench``: throughput in-process (vs sentence-transformers or transformers) or of a running server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli.app import app, int_list, one_line_errors
from toolkit.errors import ConfigError
from toolkit.model_source import require_extra

__all__ = ["bench"]


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

    with one_line_errors():
        sizes = int_list(batch_sizes, "--batch-sizes")
        if server:
            result = bench_mod.bench_server(server, artifact=artifact, corpus=corpus, api_key=api_key,
                                            concurrency=int_list(concurrency, "--concurrency"),
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


