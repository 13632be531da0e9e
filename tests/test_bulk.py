"""`toolkit embed`: every input format, the options of the APIs, bad rows, resume after a kill, bounded memory,
and the Ray engine against the in-process one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from toolkit.bulk import BulkError, BulkOptions, embed_files
from toolkit.corpus import load_corpus
from toolkit.errors import ConfigError
from toolkit.runtime import Embedder
from toolkit.runtime.encoding import quantize

TOOLKIT = [sys.executable, "-m", "toolkit.cli"]


def corpus_texts(n: int) -> list[str]:
    return load_corpus(limit=n)  # the bundled corpus: the tests read nothing outside the repository


@pytest.fixture(scope="module")
def embedder(tiny_artifact) -> Embedder:
    return Embedder(tiny_artifact)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # CSV's hard cases ride along: commas, quotes, a quoted newline (not in the text format, one text a line)
    return corpus_texts(300) + ['a, "quoted", comma', "line one\nline two"]


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(folder)


def vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return np.asarray(table[column].combine_chunks().flatten()).reshape(table.num_rows, -1)


def write_inputs(folder: Path, texts: list[str]) -> dict[str, Path]:
    """The same rows (ids 1000.., text) as Parquet, JSON Lines, CSV; text without its newline row."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"doc_id": list(range(1000, 1000 + len(texts))), "text": texts})
    pq.write_table(table, folder / "in.parquet", row_group_size=64)
    with (folder / "in.jsonl").open("w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    pcsv.write_csv(table, folder / "in.csv")
    (folder / "in.txt").write_text("".join(t + "\n" for t in texts if "\n" not in t))
    return {p.suffix[1:]: p for p in folder.iterdir()}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_each_format_equals_the_embedder_in_input_order(fmt, tiny_artifact, embedder, texts, tmp_path):
    inputs = write_inputs(tmp_path / "in", texts)
    summary = embed_files(tiny_artifact, inputs[fmt], tmp_path / "out",
                          BulkOptions(id_column="doc_id", truncate=True, rows_per_part=100, window=48))
    table = read_output(tmp_path / "out")
    assert table.column_names == ["doc_id", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 24)
    assert table["doc_id"].to_pylist() == list(range(1000, 1000 + len(texts)))
    reference = embedder.embed(texts, truncate_prompt_tokens=-1)
    np.testing.assert_allclose(vectors(table), reference, atol=1e-6)
    assert (summary.rows, summary.skipped, summary.parts) == (len(texts), 0, 4)
    assert summary.tokens == sum(len(t) for t in embedder.tokenize_inputs(texts, truncate_prompt_tokens=-1))


def test_text_lines_directory_and_glob_number_rows_across_files(tiny_artifact, embedder, texts, tmp_path):
    lines = [t for t in texts if "\n" not in t]
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(lines[:120]) + "\n")
    (folder / "b.txt").write_text("\r\n".join(lines[120:]))  # CRLF, no final newline
    reference = embedder.embed(lines, truncate_prompt_tokens=-1)
    for spec, out in ((folder, tmp_path / "dir"), (f"{folder}/*.txt", tmp_path / "glob")):
        embed_files(tiny_artifact, spec, out, BulkOptions(truncate=True, window=50))
        table = read_output(out)
        assert table["row"].to_pylist() == list(range(len(lines)))
        np.testing.assert_allclose(vectors(table), reference, atol=1e-6)


def test_options_match_the_apis(tiny_artifact, embedder, texts, tmp_path):
    inputs = write_inputs(tmp_path / "in", texts[:64])
    sample = texts[:64]
    cases = {
        "dims": (BulkOptions(dimensions=8, truncate=True), embedder.embed(sample, dimensions=8, truncate_prompt_tokens=-1)),
        "prompt": (BulkOptions(prompt_name="query", truncate=True),
                   embedder.embed(sample, prompt_name="query", truncate_prompt_tokens=-1)),
        "raw": (BulkOptions(normalize=False, truncate=True),
                embedder.embed(sample, normalize=False, truncate_prompt_tokens=-1)),
    }
    for name, (options, reference) in cases.items():
        embed_files(tiny_artifact, inputs["jsonl"], tmp_path / name, options)
        np.testing.assert_allclose(vectors(read_output(tmp_path / name)), reference, atol=1e-6, err_msg=name)
    unit = embedder.embed(sample, truncate_prompt_tokens=-1)
    value_range = tuple(embedder.manifest.quantization_range or (-1.0, 1.0))
    for kind, arrow_type, width in (("int8", pa.int8(), 24), ("uint8", pa.uint8(), 24), ("binary", pa.int8(), 3),
                                    ("ubinary", pa.uint8(), 3)):
        embed_files(tiny_artifact, inputs["jsonl"], tmp_path / kind, BulkOptions(embedding_type=kind, truncate=True))
        table = read_output(tmp_path / kind)
        assert table.schema.field("embedding").type == pa.list_(arrow_type, width)
        np.testing.assert_array_equal(vectors(table), quantize(unit, kind, value_range, embedder.dimensions))


def test_sparse_artifact_writes_indices_and_values(splade_artifact, tmp_path):
    sample = corpus_texts(40)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample))
    embed_files(splade_artifact, source, tmp_path / "out", BulkOptions(truncate=True, window=16))
    table = read_output(tmp_path / "out")
    assert table.column_names == ["row", "indices", "values"]
    reference = Embedder(splade_artifact).embed_sparse(sample, truncate_prompt_tokens=-1)
    for row, (indices, values) in zip(table.to_pylist(), reference):
        assert row["indices"] == indices.tolist()
        np.testing.assert_allclose(row["values"], values, rtol=1e-6)
    with pytest.raises(ConfigError, match="--dimensions and --embedding-type do not apply"):
        embed_files(splade_artifact, source, tmp_path / "x", BulkOptions(embedding_type="int8"))


def test_image_column_of_paths_and_bytes(clip_artifact, tmp_path):
    from PIL import Image

    paths = []
    for i, size in enumerate([(40, 30), (17, 50), (64, 64)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(path)
        paths.append(str(path))
    blobs = [Path(p).read_bytes() for p in paths]
    pq.write_table(pa.table({"path": paths, "blob": blobs}), tmp_path / "images.parquet")
    clip = Embedder(clip_artifact)
    reference = clip.embed_images(paths)
    for column in ("path", "blob"):
        embed_files(clip, tmp_path / "images.parquet", tmp_path / column, BulkOptions(image_column=column))
        np.testing.assert_allclose(vectors(read_output(tmp_path / column)), reference, atol=1e-6)
    pq.write_table(pa.table({"path": [paths[0], str(tmp_path / "missing.png"), paths[2]]}), tmp_path / "bad.parquet")
    with pytest.raises(BulkError, match="row row=1"):
        embed_files(clip, tmp_path / "bad.parquet", tmp_path / "bad", BulkOptions(image_column="path"))
    summary = embed_files(clip, tmp_path / "bad.parquet", tmp_path / "bad", BulkOptions(image_column="path", on_error="skip"),
                          overwrite=True)
    assert (summary.rows, summary.skipped) == (2, 1)
    np.testing.assert_allclose(vectors(read_output(tmp_path / "bad")), reference[[0, 2]], atol=1e-6)


def test_bad_rows_stop_with_the_id_or_are_skipped_and_listed(tiny_artifact, splade_artifact, embedder, tmp_path):
    long_text = "word " * 1000  # past the tiny model's 96 tokens and SPLADE-tiny's 512
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": ""}, {"id": "c"}, {"id": "d", "text": long_text},
            {"id": "e", "text": 7}, {"id": "f", "text": "   "}, {"id": "g", "text": "also fine"}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BulkError, match=r"row id='b': empty text; --on-error skip"):
        embed_files(tiny_artifact, source, tmp_path / "stop", BulkOptions(id_column="id"))
    summary = embed_files(tiny_artifact, source, tmp_path / "skip", BulkOptions(id_column="id", on_error="skip",
                                                                                 rows_per_part=3))
    assert (summary.rows, summary.skipped) == (2, 5)
    table = read_output(tmp_path / "skip")
    assert table["id"].to_pylist() == ["a", "g"]
    np.testing.assert_allclose(vectors(table), embedder.embed(["fine", "also fine"]), atol=1e-6)
    skipped = [json.loads(line) for line in (tmp_path / "skip" / "_skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["b", "c", "d", "e", "f"]
    assert "longer than the model's maximum of 96 tokens; --truncate" in skipped[2]["error"]
    assert skipped[1]["error"] == "no 'text' value"
    # windows where no row survives, refused before tokenizing (empty, missing) or by it (too long), for a dense
    # and a sparse artifact: empty columns of the output's types
    for artifact, out in ((tiny_artifact, "none-dense"), (splade_artifact, "none-sparse")):
        summary = embed_files(artifact, source, tmp_path / out, BulkOptions(id_column="id", on_error="skip",
                                                                           rows_per_part=1))
        assert (summary.rows, summary.skipped, summary.parts) == (2, 5, 7)
        assert read_output(tmp_path / out)["id"].to_pylist() == ["a", "g"]
    # a part whose every row was skipped is still written (empty), so resume's numbering holds
    progress = json.loads((tmp_path / "skip" / "_progress.json").read_text())
    assert [p["rows"] for p in progress["parts"]] == [1, 0, 1] and progress["complete"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "txt"])
def test_a_missing_column_is_named_with_the_columns_the_input_has(fmt, tiny_artifact, texts, tmp_path):
    path = write_inputs(tmp_path / "in", texts[:5])[fmt]
    have = "text (a plain-text input is one text a line" if fmt == "txt" else "doc_id, text (set --text-column"
    for options in (BulkOptions(text_column="body"), BulkOptions(id_column="key")):
        missing = options.id_column or options.text_column
        with pytest.raises(ConfigError, match=re.escape(f"{path}: no column '{missing}'; it has: {have}")):
            embed_files(tiny_artifact, path, tmp_path / "out", options)
        assert not (tmp_path / "out").exists()
    if fmt == "jsonl":  # the report: the command said "row row=0: no 'body' value"
        done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(path), "-o", str(tmp_path / "o"),
                               "--text-column", "body"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no column 'body'; it has: doc_id, text" in done.stderr, done.stderr
        # a field only some rows lack makes those rows bad rows, not the file
        path.write_text(json.dumps({"doc_id": 1, "body": "x"}) + "\n" + json.dumps({"doc_id": 2}) + "\n")
        with pytest.raises(BulkError, match="row doc_id=2: no 'body' value"):
            embed_files(tiny_artifact, path, tmp_path / "out", BulkOptions(text_column="body", id_column="doc_id"))


def test_a_run_that_records_no_part_leaves_nothing_that_blocks_the_rerun(tiny_artifact, tmp_path):
    source = tmp_path / "rows.jsonl"
    rows = [{"id": "a", "text": ""}, {"id": "b", "text": "fine"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "new" / "out"
    with pytest.raises(BulkError, match="row id='a': empty text"):
        embed_files(tiny_artifact, source, out, BulkOptions(id_column="id"))
    assert not (tmp_path / "new").exists()  # the folders it made are gone again
    rows[0]["text"] = "fixed"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = embed_files(tiny_artifact, source, out, BulkOptions(id_column="id"))  # no --overwrite needed
    assert (summary.rows, summary.parts) == (2, 1) and read_output(out)["id"].to_pylist() == ["a", "b"]
    # a folder it found stays, and so does what it held (here after --overwrite removed the earlier output)
    (out / "keep.txt").write_text("mine")
    source.write_text(json.dumps({"id": "a", "text": 7}) + "\n")
    with pytest.raises(BulkError, match="row id='a': 'text' is not a string"):
        embed_files(tiny_artifact, source, out, BulkOptions(id_column="id"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BulkError):
        embed_files(tiny_artifact, source, empty, BulkOptions(id_column="id"))
    assert empty.is_dir() and not any(empty.iterdir())
    # Ctrl-C before the first part is recorded: the same
    source.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(10)))

    def interrupt(rows: int, tokens: int, skipped: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_files(tiny_artifact, source, empty, BulkOptions(id_column="id", window=4), on_progress=interrupt)
    assert not any(empty.iterdir())
    # a run that recorded parts keeps them (and its progress) for --resume; only the part in flight goes
    def interrupt_late(rows: int, tokens: int, skipped: int, seen=[]) -> None:  # noqa: B006
        seen.append(rows)
        if sum(seen) > 3:  # the second part's first rows: the first part is recorded
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_files(tiny_artifact, source, empty, BulkOptions(id_column="id", window=3, rows_per_part=3),
                    on_progress=interrupt_late)
    assert sorted(p.name for p in empty.iterdir()) == ["_progress.json", "part-00000.parquet"]
    summary = embed_files(tiny_artifact, source, empty, BulkOptions(id_column="id", window=3, rows_per_part=3),
                          resume=True)
    assert summary.resumed_rows == 3 and read_output(empty)["id"].to_pylist() == list(range(10))
    assert (summary.parts, summary.resumed_parts, summary.rows) == (4, 1, 7)  # 3 parts new, 1 already done


def test_progress_moves_batch_by_batch_within_a_window(tiny_artifact, texts, tmp_path):
    source = write_inputs(tmp_path / "in", texts[:200])["jsonl"]
    calls = []
    summary = embed_files(tiny_artifact, source, tmp_path / "out", BulkOptions(id_column="doc_id", truncate=True),
                          on_progress=lambda rows, tokens, skipped: calls.append((rows, tokens, skipped)))
    assert summary.parts == 1  # default settings: the 200 rows are one window and one part ...
    moved = [rows for rows, _, _ in calls if rows]
    assert len(moved) > 1, calls  # ... and yet the rows are told as the model's batches finish, not all at the end
    assert sum(moved) == 200 and sum(t for _, t, _ in calls) == summary.tokens


@pytest.mark.parametrize("args, message", [
    (["--embedding-type", "fp4"], "--embedding-type 'fp4' is not one of: float, int8, uint8, binary, ubinary"),
    (["--on-error", "ignore"], "--on-error 'ignore' is not one of: stop, skip"),
    (["--text-column", "body"], "no column 'body'; it has: doc_id, text"),
    (["--engine", "spark"], "--engine must be one of: local, ray"),
    (["--dimensions", "5"], "dimensions 5 is not supported by this model; allowed: 8, 16, 24"),
    (["--engine", "ray", "--resume"], "--resume is for --engine local"),
])
def test_cli_errors_are_one_line(args, message, tiny_artifact, texts, tmp_path):
    inputs = write_inputs(tmp_path / "in", texts[:5])
    done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(inputs["parquet"]), "-o", str(tmp_path / "o"),
                           *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, repr(done.stderr)


def test_cli_missing_input_and_occupied_output(tiny_artifact, tmp_path):
    done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nope.jsonl: no such file or directory" in done.stderr
    assert done.stderr.startswith("error: "), repr(done.stderr)  # no blank line first
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(tmp_path / "in.txt"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not empty; --resume continues an interrupted run, --overwrite" in done.stderr
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(tmp_path / "latin1.txt"), "-o", str(tmp_path / "l")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "latin1.txt: not UTF-8 text" in done.stderr and "Traceback" not in done.stderr


def _big_jsonl(path: Path, rows: int) -> list[str]:
    base = corpus_texts(500)
    texts = [f"{i}: {base[i % len(base)]}" for i in range(rows)]
    path.write_text("".join(json.dumps({"key": f"k{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return texts


def test_kill_mid_run_then_resume_is_complete_and_duplicate_free(tiny_artifact, embedder, tmp_path):
    texts = _big_jsonl(tmp_path / "big.jsonl", 6000)
    out = tmp_path / "out"
    command = [*TOOLKIT, "embed", str(tiny_artifact), str(tmp_path / "big.jsonl"), "-o", str(out), "--id-column",
               "key", "--truncate", "--rows-per-part", "500", "--window", "100", "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / "_progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once two parts are recorded and a third is in flight
        if progress.is_file() and len(json.loads(progress.read_text() or "{}").get("parts", [])) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_parts = json.loads(progress.read_text())["parts"]
    assert 2 <= len(done_parts) < 12, "the run finished before it could be killed"
    assert not json.loads(progress.read_text())["complete"]
    # changed options are refused; a plain rerun is refused
    refused = subprocess.run([*command[:-2], "--threads", "2", "--resume", "--dimensions", "8"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "was written with other options" in refused.stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_parts) * 500:,} rows were done before (--resume)" in resumed.stderr
    table = read_output(out)
    keys = table["key"].to_pylist()
    assert keys == [f"k{i}" for i in range(6000)]  # all rows, once each, in input order
    np.testing.assert_allclose(vectors(table), embedder.embed(texts, truncate_prompt_tokens=-1), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["_progress.json", *[f"part-{i:05d}.parquet" for i in range(12)]]
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "6,000 rows were done before" in again.stderr


def _recorded(out: Path) -> tuple[int, int]:
    """(rows, parts) the output's progress file records as done."""
    try:
        state = json.loads((out / "_progress.json").read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return 0, 0
    return state["rows_read"], len(state["parts"])


def test_ctrl_c_says_what_is_saved_and_the_resume_says_what_is_new(tiny_artifact, tmp_path):
    _big_jsonl(tmp_path / "big.jsonl", 6000)
    out = tmp_path / "out"
    command = [*TOOLKIT, "embed", str(tiny_artifact), str(tmp_path / "big.jsonl"), "-o", str(out), "--id-column",
               "key", "--truncate", "--rows-per-part", "500", "--window", "100", "--threads", "1"]
    # SIGINT as the terminal sends it (a shell's background job would inherit it ignored)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _recorded(out)[1] < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    rows, parts = _recorded(out)
    assert 2 <= parts < 12, "the run finished before it could be interrupted"
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == (f"interrupted: {rows:,} rows in {parts} part(s) are saved in {out}; run the "
                                       "same command with --resume to continue where it stopped")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"6,000 rows in 12 part(s) ({12 - parts} new, {parts} already done); this run: {6000 - rows:,} rows, "
            in resumed.stderr), resumed.stderr
    assert read_output(out)["key"].to_pylist() == [f"k{i}" for i in range(6000)]


def test_ctrl_c_before_the_first_part_says_nothing_is_kept(tiny_artifact, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from toolkit.bulk.rows import RowEncoder
    from toolkit.cli import app

    def interrupted(self, ids, values, on_batch=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(RowEncoder, "__call__", interrupted)  # Ctrl-C in the first window
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["embed", str(tiny_artifact), str(tmp_path / "in.txt"), "-o", str(out)])
    assert result.exit_code == 130 and not out.exists()
    assert result.stderr.splitlines()[-1] == (f"interrupted: no part was finished, so {out} keeps nothing; run the "
                                              "same command again to start over")


def _peak_rss_mb(artifact: Path, rows: int, tmp_path: Path) -> float:
    """`toolkit embed` reading ``rows`` generated texts (~1 KB each) from a pipe: its peak RSS in MiB."""
    fifo = tmp_path / f"rows-{rows}.txt"
    os.mkfifo(fifo)
    line = ("lorem ipsum dolor sit amet " * 40).strip()

    def feed() -> None:
        with fifo.open("w") as f:
            for i in range(rows):
                f.write(f"{i} {line}\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    proc = subprocess.Popen([*TOOLKIT, "embed", str(artifact), str(fifo), "-o", str(tmp_path / f"out-{rows}"),
                             "--truncate", "--rows-per-part", "10000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    writer.join(timeout=10)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pq.ParquetFile(tmp_path / f"out-{rows}" / "part-00000.parquet").metadata.num_rows == min(rows, 10_000)
    return usage.ru_maxrss / 1024


def test_memory_stays_flat_as_the_input_grows(tiny_artifact, tmp_path):
    # held whole, 32k rows would be ~35 MB of text and ~100 MB of token ids more than 4k rows
    small = _peak_rss_mb(tiny_artifact, 4_000, tmp_path)
    large = _peak_rss_mb(tiny_artifact, 32_000, tmp_path)  # ~35 MB of text streamed through a pipe
    assert large - small < 40, f"peak RSS grew from {small:.0f} MiB to {large:.0f} MiB with 8x the input"


# ---------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_engine_equals_in_process_row_for_row(ray_local, tiny_artifact, tmp_path):
    from toolkit.bulk import embed_with_ray

    _big_jsonl(tmp_path / "in.jsonl", 3000)
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write(json.dumps({"key": "empty", "text": ""}) + "\n")
    options = BulkOptions(truncate=True, on_error="skip", window=256)
    local = embed_files(tiny_artifact, tmp_path / "in.jsonl", tmp_path / "local", options)
    on_ray = embed_with_ray(tiny_artifact, tmp_path / "in.jsonl", tmp_path / "ray", options)
    assert (on_ray.rows, on_ray.skipped) == (local.rows, local.skipped) == (3000, 1)
    a = read_output(tmp_path / "local")
    b = read_output(tmp_path / "ray").sort_by("row")
    assert a["row"].to_pylist() == b["row"].to_pylist() == list(range(3000))
    cosine = (vectors(a) * vectors(b)).sum(axis=1)
    assert cosine.min() >= 0.99999
    assert json.loads((tmp_path / "ray" / "_skipped.jsonl").read_text()) == {"id": 3000, "error": "empty text"}


def test_embed_dataset_api_on_a_users_dataset(ray_local, tiny_artifact, embedder):
    from toolkit.bulk import embed_dataset

    texts = corpus_texts(200)
    ds = ray_local.data.from_items([{"pid": f"p{i}", "body": t} for i, t in enumerate(texts)])
    out = embed_dataset(ds, tiny_artifact, BulkOptions(text_column="body", id_column="pid", truncate=True,
                                                       dimensions=16), actors=1)
    rows = sorted(out.take_all(), key=lambda r: int(r["pid"][1:]))
    assert [r["pid"] for r in rows] == [f"p{i}" for i in range(200)]
    got = np.stack([np.asarray(r["embedding"]) for r in rows])
    np.testing.assert_allclose(got, embedder.embed(texts, dimensions=16, truncate_prompt_tokens=-1), atol=1e-6)


def test_cli_engine_ray_starts_a_local_ray_and_summarizes(tiny_artifact, embedder, texts, tmp_path):
    inputs = write_inputs(tmp_path / "in", texts[:200])
    done = subprocess.run([*TOOLKIT, "embed", str(tiny_artifact), str(inputs["csv"]), "-o", str(tmp_path / "out"),
                           "--engine", "ray", "--id-column", "doc_id", "--truncate"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "200 rows in" in done.stderr and "INFO" not in done.stderr
    table = read_output(tmp_path / "out").sort_by("doc_id")
    np.testing.assert_allclose(vectors(table), embedder.embed(texts[:200], truncate_prompt_tokens=-1), atol=1e-6)


def test_ray_engine_checks_columns_first_and_a_failed_run_leaves_nothing(ray_local, tiny_artifact, tmp_path):
    from toolkit.bulk import embed_with_ray

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{source}: no column 'body'; it has: text")):
        embed_with_ray(tiny_artifact, source, tmp_path / "out", BulkOptions(text_column="body"))
    # through the command, which owns its Ray: a job that fails leaves actors behind in a shared Ray session
    command = [*TOOLKIT, "embed", str(tiny_artifact), str(source), "-o", str(tmp_path / "out"), "--engine", "ray"]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "empty text" in failed.stderr, failed.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    source.write_text(json.dumps({"text": "fixed"}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # no --overwrite needed
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_output(tmp_path / "out")["row"].to_pylist() == [0, 1]
