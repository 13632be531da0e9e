"""Input files: Parquet, JSON Lines, CSV and text, found by extension, checked for their columns before
anything is written, and read in windows of rows (never held whole)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.bulk.options import _EXTENSIONS, FORMATS, BulkError, BulkOptions, require_pyarrow
from toolkit.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa


__all__ = ["check_columns", "count_rows", "file_format", "input_files", "read_windows"]


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
    return options.value_columns + ([options.id_column] if options.id_column else [])


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

            types = {options.text_column: pa.string()} if options.image_column is None or options.paired else {}
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
    id_column, columns = options.id_column, options.value_columns
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
            values.append(options.row_values([[record.get(c)] for c in columns])[0])
            if len(values) == options.window:
                yield emit()
                ids, values, no_id = [], [], 0
    if values:
        yield emit()


def _split(batch: pa.RecordBatch, options: BulkOptions) -> tuple[pa.Array | None, list]:
    ids = batch.column(options.id_column) if options.id_column else None
    return ids, options.row_values([batch.column(c).to_pylist() for c in options.value_columns])


