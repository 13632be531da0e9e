"""Bulk embedding of datasets: ``toolkit embed`` and its Python API.

In-process (the default engine) the input is read in record batches, embedded
window by window (the runtime's length-sorted planner over each window, output
back in input order) and written as Parquet parts of a fixed number of rows,
each part renamed into place when complete and then recorded in
``_progress.json``. A crash or Ctrl-C loses at most the part in flight;
``resume=True`` continues after the last recorded part, and the result is
complete and duplicate-free. A run that fails before recording a part takes
back what it made (its progress file, the folders it created), so the
corrected rerun needs no ``overwrite``; files it found stay.

With Ray (``embed_dataset`` and ``--engine ray``) Ray Data reads, distributes
and writes; each actor opens the artifact once and embeds its batches with the
same :class:`RowEncoder`, so both engines produce the same rows.

Needs pyarrow (the ``[bulk]`` extra); Ray is the ``[ray]`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from toolkit.errors import ConfigError, InputTooLongError, RequestError, ToolkitError
from toolkit.model_source import install_hint

if TYPE_CHECKING:
    import pyarrow as pa

    from toolkit.runtime import Embedder

__all__ = ["BulkError", "BulkOptions", "RowEncoder", "Summary", "embed_dataset", "embed_files", "input_files"]

FORMATS = ("parquet", "jsonl", "csv", "text")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".csv": "csv", ".txt": "text", ".text": "text"}
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
ON_ERROR = ("stop", "skip")
PROGRESS_FILE = "_progress.json"
SKIPPED_FILE = "_skipped.jsonl"  # "_" first: Parquet dataset readers skip it
ROW_NUMBER = "row"  # the id column's name when the input names none


class BulkError(ToolkitError):
    """A row that cannot be embedded (with ``on_error="stop"``) or an output that cannot be resumed."""


class BulkOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What to embed and how; the same fields as the HTTP APIs where they overlap."""

    text_column: str = "text"
    image_column: str | None = None  # two-tower artifacts: a column of image paths or encoded bytes
    id_column: str | None = None  # kept in the output; without one, the row number (0-based, across files)
    input_format: str | None = None  # parquet | jsonl | csv | text; default: from the file extension
    dimensions: int | None = None
    prompt_name: str | None = None
    normalize: bool | None = None
    embedding_type: str = "float"
    truncate: bool = False  # cut over-long texts to the model's maximum instead of refusing them
    on_error: str = "stop"
    rows_per_part: int = 50_000
    window: int = 2048  # rows tokenized and length-sorted together

    def validate(self) -> None:
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ConfigError(f"--embedding-type '{self.embedding_type}' is not one of: {', '.join(EMBEDDING_TYPES)}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error '{self.on_error}' is not one of: {', '.join(ON_ERROR)}")
        if self.input_format is not None and self.input_format not in FORMATS:
            raise ConfigError(f"--input-format '{self.input_format}' is not one of: {', '.join(FORMATS)}")
        if self.rows_per_part < 1 or self.window < 1:
            raise ConfigError("--rows-per-part and --window must be at least 1")

    @property
    def id_name(self) -> str:
        return self.id_column or ROW_NUMBER

    @property
    def value_column(self) -> str:
        return self.image_column or self.text_column


def require_pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(f"bulk embedding needs pyarrow, the [bulk] extra: {install_hint('bulk')}") from None
    return pyarrow


# ---------------------------------------------------------------------------- embedding rows


class Encoded(msgspec.Struct):
    """One window's result: the output rows (in input order), the rows refused and why, tokens read."""

    table: Any  # pyarrow.Table
    skipped: list[tuple[Any, str]]
    tokens: int


class RowEncoder:
    """Embeds (ids, values) windows into output tables; one per process or Ray actor.

    Rows that cannot be embedded (an empty or missing text, one past the model's
    maximum without ``truncate``, an unreadable image) raise :class:`BulkError`
    naming the row id, or with ``on_error="skip"`` are returned in ``skipped``.
    """

    def __init__(self, embedder: Embedder, options: BulkOptions) -> None:
        pa = require_pyarrow()
        options.validate()
        self.embedder, self.options = embedder, options
        self.sparse = "embed" not in embedder.tasks  # SPLADE; BGE-M3 writes its dense vectors
        self.images = options.image_column is not None
        if self.sparse:
            embedder.require("embed_sparse")
            if options.dimensions is not None or options.embedding_type != "float":
                raise ConfigError("a sparse (SPLADE) artifact writes (indices, values); --dimensions and "
                                  "--embedding-type do not apply")
            if self.images:
                raise ConfigError("a sparse artifact embeds text only; drop --image-column")
            self.plan = None
            self.fields = [pa.field("indices", pa.list_(pa.int32())), pa.field("values", pa.list_(pa.float32()))]
        else:
            if self.images and "image" not in embedder.modalities:
                raise ConfigError(f"this {embedder.kind} artifact has no image tower; drop --image-column")
            try:
                self.plan = embedder.plan_output(options.dimensions, options.normalize, image=self.images)
            except RequestError as exc:
                raise ConfigError(exc.message) from None
            dims = options.dimensions or embedder.dimensions
            if options.embedding_type in ("int8", "uint8") and not self._unit_vectors():
                raise ConfigError(f"--embedding-type {options.embedding_type} quantizes unit vectors; drop "
                                  "--no-normalize or write float")
            width, kind = {"float": (dims, pa.float32()), "int8": (dims, pa.int8()), "uint8": (dims, pa.uint8()),
                           "binary": ((dims + 7) // 8, pa.int8()),
                           "ubinary": ((dims + 7) // 8, pa.uint8())}[options.embedding_type]
            self.width = width
            self.fields = [pa.field("embedding", pa.list_(kind, width))]

    def _unit_vectors(self) -> bool:
        return self.embedder.card.normalize if self.options.normalize is None else self.options.normalize

    def schema(self, id_type: pa.DataType) -> pa.Schema:
        pa = require_pyarrow()
        return pa.schema([pa.field(self.options.id_name, id_type), *self.fields])

    # ------------------------------------------------------------ per window
    def __call__(self, ids: pa.Array, values: Sequence) -> Encoded:
        pa = require_pyarrow()
        bad: dict[int, str] = {}
        for i, value in enumerate(values):
            if value is None:
                bad[i] = f"no {self.options.value_column!r} value"
            elif not self.images and not isinstance(value, str):
                bad[i] = f"{self.options.value_column!r} is not a string ({type(value).__name__})"
            elif not self.images and not value.strip():
                bad[i] = "empty text"
        good = [i for i in range(len(values)) if i not in bad]
        rows, tokens = self._embed([values[i] for i in good], good, bad) if good else ([], 0)
        good = [i for i in good if i not in bad]
        if bad and self.options.on_error == "stop":
            first = min(bad)
            raise BulkError(f"row {self.options.id_name}={ids[first].as_py()!r}: {bad[first]}; --on-error skip "
                            f"records such rows in {SKIPPED_FILE} and goes on")
        columns = [ids.take(pa.array(good, pa.int64())) if bad else ids, *self._columns(rows)]
        table = pa.Table.from_arrays(columns, schema=self.schema(ids.type))
        return Encoded(table, [(ids[i].as_py(), bad[i]) for i in sorted(bad)], tokens)

    def _embed(self, values: list, index: list[int], bad: dict[int, str]) -> tuple[np.ndarray | list, int]:
        """(vectors, or SPLADE's (indices, weights) per row; tokens read) of ``values`` (rows ``index`` of the
        window), in order; rows found bad on the way go into ``bad`` and are left out."""
        if self.images:
            return self._embed_images(values, index, bad), 0
        items = self._tokenize(values, index, bad)
        if not items:
            return [], 0
        tokens = sum(len(t) for t in items)
        if self.sparse:
            return self.embedder.sparse_tokenized(items), tokens
        return self.embedder.embed_tokenized(items, self.plan), tokens

    def _tokenize(self, texts: list[str], index: list[int], bad: dict[int, str]) -> list:
        """Tokenized texts; one call for the window, row by row only when some row is refused."""
        kwargs = {"prompt_name": self.options.prompt_name, "truncate_prompt_tokens": -1 if self.options.truncate else None}
        try:
            return self.embedder.tokenize_inputs(texts, **kwargs)
        except RequestError:
            pass
        items = []
        for text, row in zip(texts, index):
            try:
                items.extend(self.embedder.tokenize_inputs([text], **kwargs))
            except InputTooLongError:
                bad[row] = (f"longer than the model's maximum of {self.embedder.tokenizer.max_length} tokens; "
                            "--truncate cuts such texts")
            except RequestError as exc:
                bad[row] = exc.message
        return items

    def _embed_images(self, images: list, index: list[int], bad: dict[int, str]) -> np.ndarray | list:
        """Image vectors; the window in one call, image by image only when some image cannot be read (each is then
        decoded to find which; the others are embedded)."""
        embed = functools.partial(self.embedder.embed_images, dimensions=self.options.dimensions,
                                  normalize=self.options.normalize)
        try:
            return embed(images)
        except RequestError:
            pass
        keep = []
        for image, row in zip(images, index):
            try:
                self.embedder.load_images([image])
                keep.append(image)
            except RequestError as exc:
                bad[row] = exc.message.removeprefix("image 0: ")
        return embed(keep) if keep else []

    def _columns(self, rows: np.ndarray | list) -> list:
        """The output columns after the id: ``embedding`` (as ``--embedding-type``), or SPLADE's indices and values."""
        pa = require_pyarrow()
        if len(rows) == 0:
            return [pa.array([], field.type) for field in self.fields]
        if self.sparse:
            return self._sparse_columns(rows)
        match self.options.embedding_type:
            case "float":
                flat = np.ascontiguousarray(rows, np.float32)
            case kind:
                from toolkit.runtime.encoding import quantize

                value_range = tuple(self.embedder.manifest.quantization_range or (-1.0, 1.0))
                flat = quantize(rows, kind, value_range, self.embedder.dimensions)
        return [pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.width)]

    def _sparse_columns(self, entries: list[tuple[np.ndarray, np.ndarray]]) -> list:
        pa = require_pyarrow()
        offsets = np.zeros(len(entries) + 1, np.int32)
        offsets[1:] = np.cumsum([len(i) for i, _ in entries])
        indices = np.concatenate([i for i, _ in entries]).astype(np.int32)
        values = np.concatenate([v for _, v in entries]).astype(np.float32)
        return [pa.ListArray.from_arrays(pa.array(offsets), pa.array(indices)),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))]


# ---------------------------------------------------------------------------- reading


def input_files(spec: str | os.PathLike, input_format: str | None = None) -> list[Path]:
    """A file, a directory (its files of known formats, sorted) or a glob -> files; ConfigError when none."""
    path = Path(spec)
    if path.exists() and not path.is_dir():  # a file, or a named pipe streaming rows
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (input_format or p.suffix.lower() in _EXTENSIONS)
                       and not p.name.startswith((".", "_")))
    else:
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if not Path(p).is_dir())
        if not files and not any(ch in str(spec) for ch in "*?["):
            raise ConfigError(f"{spec}: no such file or directory")
    if not files:
        raise ConfigError(f"{spec}: no input files ({', '.join(sorted(_EXTENSIONS))})")
    return files


def file_format(path: Path, input_format: str | None) -> str:
    if input_format is not None:
        return input_format
    try:
        return _EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(f"{path}: cannot tell the format from '{path.suffix}'; pass --input-format "
                          f"({', '.join(FORMATS)})") from None


def count_rows(files: list[Path], options: BulkOptions) -> int | None:
    """Rows in ``files`` when cheap to know (Parquet metadata, lines of JSON Lines / text); None for CSV or pipes."""
    total = 0
    for path in files:
        fmt = file_format(path, options.input_format)
        if not path.is_file() or fmt == "csv":
            return None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
            continue
        with path.open("rb") as f:
            lines, last = 0, b"\n"
            while block := f.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
            total += lines + (last != b"\n")
    return total


def check_columns(files: list[Path], options: BulkOptions) -> None:
    """ConfigError naming the columns a file has when it lacks one the options name, the same for every format
    (before any output is written; a pipe is checked as it is read).

    A file's columns: Parquet's schema, CSV's header, the fields of the rows of JSON Lines' first window (a field
    missing from some rows only makes those rows bad rows), a text file's one column ``text``.
    """
    for path in files:
        fmt = file_format(path, options.input_format)
        if fmt == "jsonl" and path.is_file():  # its columns are what its rows hold: the reader checks its first window
            reader = _read_file(path, fmt, options)
            try:
                next(reader, None)
            finally:
                reader.close()
        elif fmt == "text" or (fmt != "jsonl" and path.is_file()):  # a pipe's rows are read once, by the run
            _check_names(path, fmt, options, _column_names(path, fmt))


def _wanted(options: BulkOptions) -> list[str]:
    return [options.value_column] + ([options.id_column] if options.id_column else [])


def _column_names(path: Path, fmt: str) -> list[str]:
    """The columns of a Parquet or CSV file (its schema; a CSV's first block), or a text file's one column."""
    pa = require_pyarrow()
    match fmt:
        case "parquet":
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(path).schema_arrow.names
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"{path}: not readable as Parquet: {exc}") from None
        case "csv":
            import pyarrow.csv as pcsv

            try:
                return pcsv.open_csv(path).schema.names
            except pa.ArrowInvalid as exc:
                raise ConfigError(f"{path}: not readable as CSV: {exc}") from None
        case "text":
            return ["text"]  # one text a line (Ray Data names the column so too)
        case _:
            raise ConfigError(f"input format '{fmt}' is not one of: {', '.join(FORMATS)}")


def _check_names(path: Path, fmt: str, options: BulkOptions, names: Sequence[str]) -> None:
    for name in _wanted(options):
        if name not in names:
            raise _missing_column(path, fmt, name, names)


def _missing_column(path: Path, fmt: str, name: str, have: Sequence[str]) -> ConfigError:
    """The one message for a column an input lacks, whatever its format."""
    if fmt == "text":
        hint = "a plain-text input is one text a line and its ids are row numbers; drop --text-column / --id-column / " \
               "--image-column"
    else:
        hint = "set --text-column / --id-column / --image-column"
    return ConfigError(f"{path}: no column '{name}'; it has: {', '.join(have) or '(none)'} ({hint})")


def read_windows(files: list[Path], options: BulkOptions) -> Iterator[tuple[pa.Array, list]]:
    """(ids, values) in input order, at most ``options.window`` rows at a time, never the whole input."""
    pa = require_pyarrow()
    row = 0
    for path in files:
        for ids, values in _read_file(path, file_format(path, options.input_format), options):
            if options.id_column is None:
                ids = pa.array(np.arange(row, row + len(values), dtype=np.int64))
            row += len(values)
            yield ids, values


def _read_file(path: Path, fmt: str, options: BulkOptions) -> Iterator[tuple[pa.Array | None, list]]:
    pa = require_pyarrow()
    window, wanted = options.window, _wanted(options)
    match fmt:
        case "parquet":
            import pyarrow.parquet as pq

            _check_names(path, fmt, options, _column_names(path, fmt))
            for batch in pq.ParquetFile(path).iter_batches(batch_size=window, columns=wanted):
                yield _split(batch, options)
        case "csv":
            import pyarrow.csv as pcsv

            types = {options.text_column: pa.string()} if options.image_column is None else {}
            try:
                reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
            except pa.ArrowInvalid as exc:
                raise ConfigError(f"{path}: not readable as CSV: {exc}") from None
            _check_names(path, fmt, options, reader.schema.names)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except pa.ArrowInvalid as exc:
                    raise BulkError(f"{path}: CSV error: {exc}") from None
                for start in range(0, batch.num_rows, window):
                    yield _split(batch.slice(start, window).select(wanted), options)
        case "jsonl":
            yield from _read_jsonl(path, options)
        case "text":
            _check_names(path, fmt, options, _column_names(path, fmt))
            values = []
            with path.open(encoding="utf-8", newline="") as f:
                try:
                    for line in f:
                        values.append(line.rstrip("\r\n") if line.endswith("\n") else line)
                        if len(values) == window:
                            yield None, values
                            values = []
                except UnicodeDecodeError as exc:
                    raise BulkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a block); "
                                    "convert it, or give JSON Lines or Parquet") from None
            if values:
                yield None, values
        case _:
            raise ConfigError(f"input format '{fmt}' is not one of: {', '.join(FORMATS)}")


def _read_jsonl(path: Path, options: BulkOptions) -> Iterator[tuple[pa.Array | None, list]]:
    """JSON Lines windows. A column no row of the first window holds is missing from the file (ConfigError naming
    the fields those rows hold); a row without the id is an error at its line, one without its value a bad row."""
    pa = require_pyarrow()
    id_column, column = options.id_column, options.value_column
    ids: list = []
    values: list = []
    fields: dict[str, None] | None = {}  # the first window's fields, in order of appearance; None once checked
    no_id = 0  # the first line of the window without an id

    def emit() -> tuple[pa.Array | None, list]:
        nonlocal fields
        if fields is not None:
            _check_names(path, "jsonl", options, list(fields))
            fields = None
        if no_id:
            raise BulkError(f"{path}:{no_id}: no '{id_column}' field (--id-column)")
        return (pa.array(ids) if id_column else None), values

    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                raise BulkError(f"{path}:{number}: an empty line (JSON Lines holds one object a line)")
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise BulkError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise BulkError(f"{path}:{number}: a JSON {type(record).__name__}, not an object")
            if fields is not None:
                fields.update(dict.fromkeys(record))
            if id_column is not None:
                if id_column not in record:
                    no_id = no_id or number
                ids.append(record.get(id_column))
            values.append(record.get(column))
            if len(values) == options.window:
                yield emit()
                ids, values, no_id = [], [], 0
    if values:
        yield emit()


def _split(batch: pa.RecordBatch, options: BulkOptions) -> tuple[pa.Array | None, list]:
    ids = batch.column(options.id_column) if options.id_column else None
    return ids, batch.column(options.value_column).to_pylist()


# ---------------------------------------------------------------------------- in-process engine


class Summary(msgspec.Struct):
    output: str
    rows: int  # embedded and written
    skipped: int
    tokens: int
    seconds: float
    parts: int
    resumed_rows: int = 0  # rows found done by --resume (not counted in rows/tokens)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _fingerprint(embedder: Embedder, files: list[Path], options: BulkOptions) -> dict:
    """What an output directory was made from: a resume must match it."""
    return {"artifact": embedder.path.name, "artifact_bytes": embedder.path.stat().st_size,
            "model": embedder.card.name, "inputs": [str(p) for p in files],
            "options": msgspec.to_builtins(msgspec.structs.replace(options, window=0))}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def embed_files(
    artifact: str | os.PathLike | Embedder,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    options: BulkOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int, int, int], None] | None = None,
    on_start: Callable[[int | None, int], None] | None = None,
) -> Summary:
    """Embed ``inputs`` (files, a directory or a glob) into Parquet parts under the directory ``output``.

    ``on_start(total_rows or None, rows already done)`` is called once, ``on_progress(rows, tokens, skipped)``
    after every window. Returns the run's :class:`Summary`.
    """
    from toolkit.runtime import Embedder

    options = options or BulkOptions()
    options.validate()
    pq = _parquet()
    if isinstance(inputs, (str, os.PathLike)):
        files = input_files(inputs, options.input_format)
    else:
        files = [f for spec in inputs for f in input_files(spec, options.input_format)]
    check_columns(files, options)
    embedder = artifact if isinstance(artifact, Embedder) else Embedder(artifact)
    encoder = RowEncoder(embedder, options)
    out = Path(output)
    progress_path = out / PROGRESS_FILE
    fingerprint = _fingerprint(embedder, files, options)
    created = [p for p in (out, *out.parents) if not p.exists()]  # the folders this run makes, deepest first
    had_progress = progress_path.is_file()
    state = _open_output(out, fingerprint, resume=resume, overwrite=overwrite)
    if state.get("complete"):
        return Summary(str(out), 0, 0, 0, 0.0, len(state["parts"]), resumed_rows=state["rows_read"])
    done_rows = state["rows_read"]
    started = time.perf_counter()
    rows = skipped = tokens = 0
    part_index = len(state["parts"])
    writer = skipped_rows = None
    part_rows = part_read = part_tokens = 0
    position = 0  # rows of the input seen so far

    def close_part() -> None:
        nonlocal writer, skipped_rows, part_rows, part_read, part_tokens, part_index
        final = out / _part_name(part_index)
        writer.close()  # a part whose rows were all skipped is an empty file: the numbering stays
        os.replace(final.with_name(final.name + ".tmp"), final)
        entry = {"file": final.name, "rows": part_rows, "rows_read": part_read, "tokens": part_tokens,
                 "skipped": [list(s) for s in skipped_rows or []]}
        state["parts"].append(entry)
        state["rows_read"] += part_read
        _write_json(progress_path, state)
        writer, skipped_rows = None, None
        part_rows = part_read = part_tokens = 0
        part_index += 1

    try:
        if on_start:
            on_start(count_rows(files, options), done_rows)
        for ids, values in read_windows(files, options):
            n = len(values)
            if position + n <= done_rows:  # a finished part's rows (resume)
                position += n
                continue
            if position < done_rows:
                cut = done_rows - position
                ids, values, position = ids.slice(cut), values[cut:], done_rows
                n = len(values)
            while n:
                room = options.rows_per_part - part_read
                take = min(room, n)
                result = encoder(ids.slice(0, take), values[:take])
                if writer is None:
                    tmp = out / (_part_name(part_index) + ".tmp")
                    writer = pq.ParquetWriter(tmp, result.table.schema)
                    skipped_rows = []
                writer.write_table(result.table)
                skipped_rows.extend(result.skipped)
                part_rows += result.table.num_rows
                part_read += take
                part_tokens += result.tokens
                rows += result.table.num_rows
                skipped += len(result.skipped)
                tokens += result.tokens
                position += take
                if on_progress:
                    on_progress(take, result.tokens, len(result.skipped))
                ids, values, n = ids.slice(take), values[take:], n - take
                if part_read == options.rows_per_part:
                    close_part()
        if part_read:
            close_part()
        state["complete"] = True
        _write_skipped(out, state)
        _write_json(progress_path, state)
    except BaseException:  # an error, or Ctrl-C: the part in flight is lost
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            (out / (_part_name(part_index) + ".tmp")).unlink(missing_ok=True)
        if not state["parts"]:  # nothing to resume: what this run made would only block the corrected rerun
            _undo_output(out, created, keep_progress=resume and had_progress)
        raise
    return Summary(str(out), rows, skipped, tokens, time.perf_counter() - started, len(state["parts"]),
                   resumed_rows=done_rows)


def _parquet():
    require_pyarrow()
    import pyarrow.parquet as pq

    return pq


def _open_output(out: Path, fingerprint: dict, *, resume: bool, overwrite: bool) -> dict:
    """The progress state to continue from: a fresh one, or the recorded one on resume (stray files removed)."""
    progress_path = out / PROGRESS_FILE
    fresh = {"version": 1, **fingerprint, "parts": [], "rows_read": 0, "complete": False}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory (the output is a directory of Parquet parts)")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not (resume or overwrite):
        raise ConfigError(f"{out}: not empty; --resume continues an interrupted run, --overwrite starts again")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite or not existing:
        _clean(out, keep=set())
        _write_json(progress_path, fresh)
        return fresh
    if not progress_path.is_file():
        raise ConfigError(f"{out}: has no {PROGRESS_FILE}, so it is not a `toolkit embed` output to resume")
    try:
        state = json.loads(progress_path.read_text())
    except ValueError:
        raise ConfigError(f"{out}/{PROGRESS_FILE}: unreadable; --overwrite starts again") from None
    changed = [key for key in fingerprint if state.get(key) != fingerprint[key]]
    if changed:
        raise ConfigError(f"{out}: was written with other {', '.join(changed)}; resume with the same artifact, "
                          "inputs and options, or --overwrite")
    _clean(out, keep={p["file"] for p in state["parts"]} | {PROGRESS_FILE, SKIPPED_FILE})
    return state


def _clean(out: Path, keep: set[str]) -> None:
    """Remove what an interrupted run left that the progress file does not list (parts in flight)."""
    for path in out.iterdir():
        if path.name not in keep and (path.name.startswith("part-") or path.name.endswith(".tmp")
                                      or path.name in (PROGRESS_FILE, SKIPPED_FILE)):
            path.unlink()


def _undo_output(out: Path, created: list[Path], *, keep_progress: bool) -> None:
    """Take back what a run that recorded no part made: its progress file (``keep_progress``: the one an earlier
    run left, which a resume only read) and the folders it created, when empty. Files it found stay."""
    if not keep_progress:
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else is in it now
            break


def _remove_contents(out: Path, *, remove_folder: bool) -> None:
    """Remove what a failed Ray run wrote into ``out`` (which it found empty or absent), and ``out`` if it made it."""
    if remove_folder:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _write_skipped(out: Path, state: dict) -> None:
    rows = [s for part in state["parts"] for s in part["skipped"]]
    path = out / SKIPPED_FILE
    if not rows:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row_id, reason in rows:
            f.write(json.dumps({"id": row_id, "error": reason}) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- Ray engine


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
        self.encoder = RowEncoder(Embedder(artifact, **overrides), options)
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        o = self.options
        result = self.encoder(batch.column(o.id_name).combine_chunks(), batch.column(o.value_column).to_pylist())
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
            columns = [options.value_column] + ([options.id_column] if options.id_column else [])
            ds = ray.data.read_parquet(paths, columns=columns)
        case "jsonl":
            ds = ray.data.read_json(paths, lines=True)
        case "csv":
            import pyarrow.csv as pcsv

            types = {options.text_column: require_pyarrow().string()} if options.image_column is None else {}
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

    RowEncoder(Embedder(artifact), options)  # the options' errors here, in one line, before Ray starts
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
