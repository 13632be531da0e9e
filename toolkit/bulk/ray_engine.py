"""The Ray Data engine: Ray reads, distributes and writes; each actor opens the artifact once and embeds
its batches with the same ``RowEncoder``."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.bulk.local import Summary, _parquet, _remove_contents
from toolkit.bulk.options import ROW_NUMBER, SKIPPED_FILE, BulkOptions, require_pyarrow
from toolkit.bulk.readers import check_columns, file_format, input_files
from toolkit.bulk.rows import RowEncoder
from toolkit.errors import ConfigError
from toolkit.model_source import install_hint

if TYPE_CHECKING:
    import pyarrow as pa


__all__ = ["embed_dataset", "embed_with_ray", "read_dataset", "require_ray"]


def require_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray Data, the [ray] extra: {install_hint('ray')}") from None
    return ray


class _RayEmbed:
    """Ray Data's callable class: opens the artifact once per actor, then embeds pyarrow batches."""

    def __init__(self, artifact: str, options: BulkOptions, threads: int | None) -> None:
        from toolkit.runtime import Embedder

        overrides = {"intra_op_threads": threads} if threads else {}
        self.encoder = RowEncoder(Embedder(artifact, adapter=options.adapter, **overrides), options)
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        o = self.options
        values = o.row_values([batch.column(c).to_pylist() for c in o.value_columns])
        result = self.encoder(batch.column(o.id_name).combine_chunks(), values)
        if o.on_error == "stop":
            return result.table
        errors = pa.array([None] * result.table.num_rows + [reason for _, reason in result.skipped], pa.string())
        refused = pa.Table.from_arrays(
            [pa.array([row_id for row_id, _ in result.skipped], result.table.schema.field(0).type),
             *[pa.nulls(len(result.skipped), f.type) for f in result.table.schema][1:]],
            schema=result.table.schema)
        return pa.concat_tables([result.table, refused]).append_column("error", errors)


def embed_dataset(
    ds,
    artifact: str | os.PathLike,
    options: BulkOptions | None = None,
    *,
    actors: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    threads: int | None = None,
    batch_size: int | None = None,
):
    """Embed a Ray Dataset: one row in -> one row out (id, embedding | indices, values).

    ``ds`` holds ``options.value_column`` and ``options.id_name`` (add row numbers yourself when the data has no
    ids). Each of ``actors`` actors opens the artifact once. Default: one per ``num_gpus`` share of the cluster's
    GPUs, or for CPU actors one per ``num_cpus`` of the cluster's CPUs less one, which stays free for Ray's read and
    write tasks (actors holding every CPU starve them and the pipeline stalls). ``threads``: each actor's
    onnxruntime threads (default: ``num_cpus``, rounded up). With ``on_error="skip"`` the result carries an
    ``error`` column: null for embedded rows; refused rows keep their id, null embeddings and the reason.
    The artifact path must be readable on every node (shared storage), or ship it with ``runtime_env``.
    """
    ray = require_ray()
    options = options or BulkOptions()
    options.validate()
    path = str(Path(artifact).resolve())
    if actors is None:
        resources = ray.cluster_resources()
        if num_gpus:
            actors = max(1, int(resources.get("GPU", 0) // num_gpus))
        else:
            actors = max(1, int((resources.get("CPU", 1) - 1) // num_cpus))
    if threads is None and not num_gpus:
        threads = max(1, math.ceil(num_cpus))
    return ds.map_batches(
        _RayEmbed, fn_constructor_args=(path, options, threads), batch_format="pyarrow",
        batch_size=batch_size or options.window, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus, num_gpus=num_gpus or None,
    )


def read_dataset(files: list[Path], options: BulkOptions):
    """The input files as a Ray Dataset with the id column (row numbers in input order without --id-column)."""
    ray = require_ray()
    formats = {file_format(p, options.input_format) for p in files}
    if len(formats) > 1:
        raise ConfigError(f"--engine ray reads one format per run; the inputs mix {', '.join(sorted(formats))}")
    paths = [str(p) for p in files]
    match formats.pop():
        case "parquet":
            columns = options.value_columns + ([options.id_column] if options.id_column else [])
            ds = ray.data.read_parquet(paths, columns=columns)
        case "jsonl":
            ds = ray.data.read_json(paths, lines=True)
        case "csv":
            import pyarrow.csv as pcsv

            types = {options.text_column: require_pyarrow().string()} if options.image_column is None or options.paired \
                else {}
            ds = ray.data.read_csv(paths, convert_options=pcsv.ConvertOptions(column_types=types))
        case "text":  # embed_with_ray's check_columns refused columns other than "text"
            ds = ray.data.read_text(paths, drop_empty_lines=False)
    if options.id_column is None:  # row numbers, in input order: needs an ordered pass
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        numbers = ray.data.range(ds.count()).rename_columns({"id": ROW_NUMBER})
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dataset.zip is deprecated in favour of join on a key we do not have
            ds = ds.zip(numbers)
    return ds


def embed_with_ray(
    artifact: str | os.PathLike,
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    options: BulkOptions | None = None,
    *,
    address: str | None = None,
    actors: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    threads: int | None = None,
    overwrite: bool = False,
) -> Summary:
    """``toolkit embed --engine ray``: read, embed and write with Ray Data (joining ``address`` or a local Ray)."""
    ray = require_ray()
    options = options or BulkOptions()
    options.validate()
    files = input_files(inputs, options.input_format)
    check_columns(files, options)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: not empty; --overwrite replaces it (--resume is for the in-process engine)")
    from toolkit.runtime import Embedder

    RowEncoder(Embedder(artifact, adapter=options.adapter), options)  # the options' errors here, in one line, before Ray starts
    if out.exists() and overwrite:
        shutil.rmtree(out)
    created = not out.exists()  # else an empty directory: whatever it holds after a failure, this run wrote
    started = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 **({} if address else {"num_cpus": os.cpu_count()}))
    import logging

    for name in ("ray", "ray.data"):  # Ray Data logs each execution plan at INFO; the command reports its own summary
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = embed_dataset(read_dataset(files, options), artifact, options, actors=actors, num_cpus=num_cpus,
                           num_gpus=num_gpus, threads=threads)
        skipped = 0
        if options.on_error == "skip":
            import pyarrow.compute as pc

            ds = ds.materialize()
            refused = ds.map_batches(lambda t: t.filter(pc.is_valid(t["error"])).select([options.id_name, "error"]),
                                     batch_format="pyarrow")
            ok = ds.map_batches(lambda t: t.filter(pc.is_null(t["error"])).drop_columns(["error"]),
                                batch_format="pyarrow")
            rows_refused = refused.take_all()
            skipped = len(rows_refused)
            ds = ok
        try:
            ds.write_parquet(str(out))
        except BaseException:  # no resume on Ray: what a failed run wrote would only block the corrected rerun
            _remove_contents(out, remove_folder=created)
            raise
        parts = sorted(out.glob("*.parquet"))
        rows = sum(_parquet().ParquetFile(p).metadata.num_rows for p in parts)
        if skipped:
            with (out / SKIPPED_FILE).open("w") as f:
                for r in rows_refused:
                    f.write(json.dumps({"id": r[options.id_name], "error": r["error"]}) + "\n")
    finally:
        if owned:
            ray.shutdown()
    return Summary(str(out), rows, skipped, 0, time.perf_counter() - started, len(parts))
