"""MODEL arguments (artifact, card, Hub id, directory), the export cache, and one-line errors for missing extras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import cache_export, free_port

from toolkit.errors import ConfigError
from toolkit.model_source import (
    DEFAULT_MODEL,
    SourceKind,
    cache_entry,
    find_cached_artifact,
    locate_source,
)
from toolkit.settings import ExportOptions, Precision

TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
# the serving install, simulated: the [export], [bulk] and [ray] extras' modules cannot be imported
NO_EXTRAS = """
import sys
for m in ("torch", "transformers", "sentence_transformers", "onnxscript", "pyarrow", "ray"):
    sys.modules[m] = None
from toolkit.cli import main
sys.argv = ["toolkit", *sys.argv[1:]]
main()
"""


def _cli(*args: str, env: dict | None = None, serving_install: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", NO_EXTRAS, *args] if serving_install else [*TOOLKIT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1", **(env or {})})


def test_sources_are_told_apart(tiny_artifact, tiny_st_dir):
    assert locate_source(None).kind is SourceKind.CARD and locate_source(None).card.name == DEFAULT_MODEL
    assert locate_source(str(tiny_artifact)).kind is SourceKind.ARTIFACT
    assert locate_source(str(tiny_st_dir)).kind is SourceKind.DIRECTORY
    assert locate_source("bge-small-en-v1.5").card.source == "BAAI/bge-small-en-v1.5"
    assert locate_source("BAAI/bge-small-en-v1.5").kind is SourceKind.CARD  # a Hub id a bundled card knows
    assert locate_source("someone/some-model").kind is SourceKind.HUB
    for bad, says in (("./missing.onnx", "no such artifact file or model directory"),
                      ("/no/such/dir", "no such artifact file or model directory"),
                      ("nonsense", "bundled cards: "), (str(tiny_st_dir / "config.json"), "got another file")):
        with pytest.raises(ConfigError, match=says):
            locate_source(bad)


def test_cache_key_follows_what_changes_the_artifact(tiny_st_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_st_dir, folder)
    source = locate_source(str(folder))
    base = cache_entry(source, ExportOptions())
    assert base.folder.parent == tmp_path / "cache" / "artifacts"
    assert cache_entry(source, ExportOptions(output=tmp_path / "x.onnx")).folder == base.folder  # output is not a key
    for changed in (ExportOptions(precision=Precision.INT8), ExportOptions(revision="v2"),
                    ExportOptions(matryoshka_dims=(8,)), ExportOptions(normalize=False)):
        assert cache_entry(source, changed).folder != base.folder
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")  # the model changed
    assert cache_entry(locate_source(str(folder)), ExportOptions()).folder != base.folder


def test_a_directory_is_exported_once_then_reused(tiny_st_dir, tmp_path, monkeypatch):
    from toolkit.export import ensure_artifact
    from toolkit.runtime import Embedder

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"no artifact in the cache .*\[export\] extra"):
        Embedder(str(tiny_st_dir))  # nothing exported yet: never an implicit export from the runtime
    first = ensure_artifact(str(tiny_st_dir))
    assert not first.reused and first.path.is_file() and (first.path.parent / "source.json").is_file()
    again = ensure_artifact(str(tiny_st_dir))
    assert again.reused and again.path == first.path
    assert find_cached_artifact(str(tiny_st_dir)) == first.path
    emb = Embedder(str(tiny_st_dir))  # a directory exported before opens its cached artifact
    assert emb.path == first.path and emb.embed(["hello"]).shape == (1, 24)
    assert Embedder(again).path == first.path  # CachedArtifact is a path-like
    leftovers = [p.name for p in first.path.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the staging folder was renamed into place

    # `toolkit serve DIR` reuses it and says so; `toolkit embed DIR` too
    port = free_port()
    proc = subprocess.Popen([*TOOLKIT, "serve", str(tiny_st_dir), "--port", str(port), "--log-level", "warning"],
                            env={**os.environ, "TOOLKIT_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            import time

            time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hello"}, timeout=10)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 24
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    said = " ".join(out.split())
    assert f"reusing the export of {tiny_st_dir} in {first.path} (exported before" in said, out


def test_taken_port_is_one_line_before_anything_else(tiny_artifact):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli("serve", str(tiny_artifact), "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: port {port} on 127.0.0.1 is taken (another server?): pass another --port"
    assert done.stdout == ""


def test_serving_install_errors_name_the_extra(tmp_path):
    cache = str(tmp_path / "empty-cache")
    cases = (
        (("export",), "toolkit export needs the [export] extra, not installed here (torch, transformers, "
                      "sentence_transformers, onnxscript missing): pip install 'onnx-embed-toolkit[export]' "
                      "(from a checkout: pip install '.[export]')"),
        (("bench", "x.onnx", "--against", "sentence-transformers"), "needs the [export] extra"),
        (("serve", "all-MiniLM-L6-v2"), f"is a bundled card with no artifact in the cache ({cache}) yet; "
                                        "exporting it needs the [export] extra"),
        (("bench", "all-MiniLM-L6-v2"), f"is a bundled card with no artifact in the cache ({cache}) yet; "
                                        "exporting it needs the [export] extra"),  # a MODEL, as serve takes it
        (("embed", "x.onnx", "in.jsonl", "-o", str(tmp_path / "out")), "no such artifact file or model directory"),
    )
    for args, says in cases:
        done = _cli(*args, env={"TOOLKIT_CACHE": cache}, serving_install=True)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert says in lines[0], (args, lines[0])
    cards = _cli("cards", "--json", serving_install=True)  # cards never import torch
    assert cards.returncode == 0 and '"all-MiniLM-L6-v2"' in cards.stdout, cards.stderr


def test_extra_names_survive_the_console(tiny_artifact, tmp_path):
    """Rich markup once ate '[bulk]' out of the message; every extra's name is printed as written."""
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    done = _cli("embed", str(tiny_artifact), str(corpus), "-o", str(tmp_path / "out"), serving_install=True)
    assert done.returncode == 2 and "the [bulk] extra: pip install 'onnx-embed-toolkit[bulk]' (from a checkout: " \
        "pip install '.[bulk]')" in done.stderr, done.stderr
    assert Path(tmp_path / "out").exists() is False or not any((tmp_path / "out").iterdir())


def test_an_uncached_hub_id_offline_is_one_line(tmp_path):
    """`toolkit serve owner/name` (not cached, Hub unreachable) says so in one line, naming the id; exit 2."""
    done = _cli("serve", "someone/some-model", "--port", "0", env={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'someone/some-model'" in last and "Hub" in last, done.stderr
    assert not any((tmp_path / "cache" / "artifacts").glob("*/model.onnx"))  # nothing half-written was kept


def test_quickstart_sets_no_cache_of_its_own():
    """One cache rule: the quickstart exports where `toolkit serve` / `embed` / `bench` and Embedder(MODEL) look
    later (TOOLKIT_CACHE if the user set it, else ~/.cache/onnx-embed-toolkit), so it must not set TOOLKIT_CACHE."""
    import re

    script = (Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh").read_text()
    commands = [line.split("#")[0] for line in script.splitlines()]
    assert not [c for c in commands if re.search(r"\bTOOLKIT_CACHE\s*=|export\s+TOOLKIT_CACHE\b", c)], script
    assert any("toolkit inspect --cache" in c for c in commands)  # it shows where the export went


def test_inspect_cache_names_the_root_the_rule_and_the_exports(tiny_artifact, tiny_st_dir, tmp_path):
    cache = tmp_path / "cache"
    by_card = cache_export(DEFAULT_MODEL, tiny_artifact, cache)
    by_dir = cache_export(str(tiny_st_dir), tiny_artifact, cache)
    (cache / "artifacts" / ".staging-leftover").mkdir()  # a crashed export's staging folder is not listed
    size = by_card.stat().st_size + (by_card.parent / "source.json").stat().st_size
    done = _cli("inspect", "--cache", env={"TOOLKIT_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"cache: {cache}"
    assert lines[1] == "rule: TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit (TOOLKIT_CACHE is set)"
    assert lines[2].startswith("exports: 2, ") and len(lines) == 5, done.stdout
    rows = {line.split()[-1]: line.split() for line in lines[3:]}
    assert rows[str(by_card)][:2] == [DEFAULT_MODEL, "fp32"] and rows[str(by_dir)][:2] == [str(tiny_st_dir), "fp32"]
    assert f"{size / 1024:.1f} KiB" in " ".join(rows[str(by_card)])
    as_json = json.loads(_cli("inspect", "--cache", "--json", env={"TOOLKIT_CACHE": str(cache)}).stdout)
    assert as_json["root"] == str(cache) and as_json["rule"] == "TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit"
    assert {(a["model"], a["artifact"], a["bytes"]) for a in as_json["artifacts"]} >= {(DEFAULT_MODEL, str(by_card), size)}

    # without TOOLKIT_CACHE: the home folder's cache, the same one Embedder("all-MiniLM-L6-v2") opens
    env = {k: v for k, v in os.environ.items() if k != "TOOLKIT_CACHE"}
    done = subprocess.run([*TOOLKIT, "inspect", "--cache"], capture_output=True, text=True, timeout=120,
                          env={**env, "HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"cache: {tmp_path / 'home' / '.cache' / 'onnx-embed-toolkit'}",
                                        "rule: TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit (TOOLKIT_CACHE is "
                                        "not set)", "exports: none yet"]
    for args in ((), ("--cache", str(tiny_artifact))):  # one or the other
        bad = _cli("inspect", *args)
        assert bad.returncode == 2 and bad.stderr.strip() == \
            "error: give an ARTIFACT to inspect, or --cache for the export cache (not both)", bad.stderr


def test_a_card_name_exported_before_is_reused_and_said_so(tiny_artifact, tmp_path):
    """`toolkit bench all-MiniLM-L6-v2` (as serve and embed) opens the cached export and says so in one line."""
    cached = cache_export(DEFAULT_MODEL, tiny_artifact, tmp_path / "cache")
    done = _cli("bench", DEFAULT_MODEL, "--batch-sizes", "2", "--repeats", "1", "--texts", "4", "--no-offline",
                "--threads", "1", env={"TOOLKIT_CACHE": str(tmp_path / "cache")}, serving_install=True)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert f"reusing the export of {DEFAULT_MODEL} in {cached} (exported before" in said, done.stderr
    assert "exporting" not in said and "sentences/s" in done.stdout


def test_toolkit_export_reuses_the_same_export_and_force_redoes_it(tiny_st_dir, tmp_path, monkeypatch):
    """`toolkit export` of a model exported before with the same options (the cache's key: other options are
    another entry, test_cache_key_follows_what_changes_the_artifact) writes its verified artifact again without
    exporting, and says so; --force exports again; the export is the cache's, which `serve` / `Embedder` of the
    same model find."""
    from toolkit.export.cache import export_to

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    first, reused = export_to(str(tiny_st_dir), ExportOptions(output=tmp_path / "first.onnx"))
    assert not reused and first.manifest.parity.passed
    cached = find_cached_artifact(str(tiny_st_dir))
    assert cached is not None and cached.read_bytes() == first.path.read_bytes()
    done = subprocess.run([*TOOLKIT, "export", str(tiny_st_dir), "-o", "again.onnx"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "reused the verified export in the cache" in done.stderr
    assert (tmp_path / "again.onnx").read_bytes() == first.path.read_bytes()
    forced, reused = export_to(str(tiny_st_dir), ExportOptions(output=tmp_path / "again.onnx"), force=True)
    assert not reused and forced.path.is_file() and find_cached_artifact(str(tiny_st_dir)).is_file()
