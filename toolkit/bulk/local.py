"""The in-process engine: windows embedded in order into Parquet parts, each renamed into place then
recorded in ``_progress.json`` (resumable; a run that fails before its first part takes back what it made)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from toolkit.bulk.options import PROGRESS_FILE, SKIPPED_FILE, BulkOptions, require_pyarrow
from toolkit.bulk.readers import check_columns, count_rows, input_files, read_windows
from toolkit.bulk.rows import RowEncoder
from toolkit.errors import ConfigError

if TYPE_CHECKING:
    from toolkit.runtime import Embedder


__all__ = ["Summary", "embed_files", "recorded"]


class Summary(msgspec.Struct):
    output: str
    rows: int  # embedded and written
    skipped: int
    tokens: int
    seconds: float
    parts: int  # in the output, the ones found done by --resume included
    resumed_rows: int = 0  # rows found done by --resume (not counted in rows/tokens)
    resumed_parts: int = 0  # parts found done by --resume (counted in parts)

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

    ``on_start(total_rows or None, rows already done)`` is called once, ``on_progress(rows, tokens, skipped)`` as
    rows complete: after each of the model's batches (rows only) and at the end of each window (its remaining
    rows, its tokens and skipped rows). Returns the run's :class:`Summary`.
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
    embedder = artifact if isinstance(artifact, Embedder) else Embedder(artifact, adapter=options.adapter)
    encoder = RowEncoder(embedder, options)
    out = Path(output)
    progress_path = out / PROGRESS_FILE
    fingerprint = _fingerprint(embedder, files, options)
    created = [p for p in (out, *out.parents) if not p.exists()]  # the folders this run makes, deepest first
    had_progress = progress_path.is_file()
    state = _open_output(out, fingerprint, resume=resume, overwrite=overwrite)
    done_rows, done_parts = state["rows_read"], len(state["parts"])
    if state.get("complete"):
        return Summary(str(out), 0, 0, 0, 0.0, done_parts, resumed_rows=done_rows, resumed_parts=done_parts)
    started = time.perf_counter()
    rows = skipped = tokens = 0
    part_index = done_parts
    writer = skipped_rows = None
    part_rows = part_read = part_tokens = 0
    position = 0  # rows of the input seen so far
    batch_rows = 0  # rows of the window in flight already reported, batch by batch

    def batch_done(n: int) -> None:
        nonlocal batch_rows
        n = min(n, take - batch_rows)  # a task that runs twice over its rows reports each row once
        if n > 0:
            batch_rows += n
            on_progress(n, 0, 0)

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
                batch_rows = 0
                result = encoder(ids.slice(0, take), values[:take], batch_done if on_progress else None)
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
                    on_progress(take - batch_rows, result.tokens, len(result.skipped))
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
                   resumed_rows=done_rows, resumed_parts=done_parts)


def recorded(output: str | os.PathLike) -> tuple[int, int]:
    """(rows, parts) that ``output``'s progress file records as done: what ``resume=True`` keeps; (0, 0) when
    it has none (a run stopped before its first part takes its progress file back)."""
    try:
        state = json.loads((Path(output) / PROGRESS_FILE).read_text())
        return int(state["rows_read"]), len(state["parts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


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


