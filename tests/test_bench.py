"""`toolkit bench` in-process: rows per batch size, the whole-corpus call, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import cache_export, serve_subprocess

from toolkit import bench


def test_bench_inprocess_against_sentence_transformers(tiny_artifact, tiny_st_dir, tmp_path):
    result = bench.bench_inprocess(tiny_artifact, corpus=None, batch_sizes=(1, 4), repeats=2, n_texts=24,
                                   against=str(tiny_st_dir), threads=1)
    labels = [(r["engine"], r["batch_size"]) for r in result["rows"]]
    assert labels == [("toolkit", 1), ("sentence-transformers", 1), ("toolkit", 4), ("sentence-transformers", 4),
                      ("toolkit", "corpus"), ("sentence-transformers", "corpus")]
    for row in result["rows"]:
        assert row["sentences_per_s"] > 0 and row["tokens_per_s"] > row["sentences_per_s"]
        assert row["ratio_vs_reference"] > 0
    assert result["min_cosine_vs_reference"] >= 0.99999  # the same model on both sides
    assert result["corpus_tokens"]["n"] == 24 and result["machine"]["cores"] >= 1
    bench.plot_result(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_bench_cli_writes_json(tiny_artifact, tmp_path):
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", str(tiny_artifact), "--batch-sizes", "2",
                           "--repeats", "1", "--texts", "8", "--no-offline", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["batch_size"]) for r in rows] == [("toolkit", 2)]
    assert "sentences/s" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", str(tiny_artifact), "--batch-sizes", "two"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_bench_images_against_transformers(clip_artifact, tmp_path):
    out = tmp_path / "images.json"
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", str(clip_artifact), "--images", "6",
                           "--against", str(clip_artifact.parent / "model"), "--batch-sizes", "1,4", "--repeats", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [(r["engine"], r["batch_size"]) for r in result["rows"]] == [
        ("toolkit", 1), ("transformers", 1), ("toolkit", 4), ("transformers", 4)]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["preprocess_share"] <= 1 and row["ratio_vs_reference"] > 0
    assert result["min_cosine_vs_reference"] >= 0.9999  # the same model on both sides, the same decoded photos
    assert "images/s" in done.stdout


def test_bench_server_report_leaves_out_ratios_it_has_no_baseline_for(capsys):
    row = {"concurrency": 8, "requests": 512, "errors": 0, "requests_per_s": 812.3, "sentences_per_s": 812.3,
           "p50_ms": 9.5, "p95_ms": 14.2, "p99_ms": 21.7}
    result = {"mode": "server", "url": "http://127.0.0.1:8000", "inputs_per_request": 1,
              "machine": bench.machine_info(), "rows": [row]}  # --server URL without a MODEL
    bench.print_result(result)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "clients" in line)
    assert "vs in-proc" not in header and "vs bs1" not in header and "p99 ms" in header
    assert "812.3" in out and "0.00" not in out  # no ratio against a baseline that was never measured
    assert "no ratios to in-process calls: give the server's MODEL too" in " ".join(out.split())
    # with the ARTIFACT, the ratios are there
    result["in_process"] = {1: {"sentences_per_s": 200.0, "ms_per_call": 5.1, "p50_ms": 4.75},
                            32: {"sentences_per_s": 1624.6, "ms_per_call": 19.7, "p50_ms": 19.5}}
    row.update(ratio_vs_inprocess_bs32=812.3 / 1624.6, p50_vs_inprocess_bs1=9.5 / 4.75)
    bench.print_result(result)
    out = capsys.readouterr().out
    assert "vs in-proc bs32" in out and "p50 vs bs1" in out and "0.50" in out and "2.00" in out
    assert "no ratios" not in out


def test_bench_takes_a_model_like_serve(tiny_artifact, tiny_st_dir, tmp_path):
    """MODEL is what `toolkit serve` takes: a model directory exported before opens its cached artifact (no Hub, no
    export); with --server, MODEL is the in-process baseline, and --server URL alone still runs."""
    cached = cache_export(str(tiny_st_dir), tiny_artifact, tmp_path / "cache")
    env = {**os.environ, "TOOLKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", str(tiny_st_dir), "--batch-sizes", "2",
                           "--repeats", "1", "--texts", "8", "--no-offline", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert f"reusing the export of {tiny_st_dir} in {cached} (exported before" in " ".join(done.stderr.split())
    result = json.loads(out.read_text())
    assert result["artifact"] == str(cached) and [(r["engine"], r["batch_size"]) for r in result["rows"]] == [
        ("toolkit", 2)]

    url, _, server = serve_subprocess(tiny_artifact, "--auto-truncate")  # as server_peers.py serves it
    try:
        for model in ((), (str(tiny_st_dir),)):
            done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", *model, "--server", url,
                                   "--concurrency", "1,2", "--requests", "8", "--threads", "1", "--json", str(out)],
                                  capture_output=True, text=True, timeout=300, env=env)
            assert done.returncode == 0, (model, done.stderr)
            result = json.loads(out.read_text())
            assert [r["concurrency"] for r in result["rows"]] == [1, 2]
            assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in result["rows"])
            assert ("in_process" in result) == bool(model), result.keys()  # the baseline comes from MODEL
        # another project's dialect (benchmarks/server_peers.py drives infinity so): OpenAI's plain body on a route
        # (no truncate_prompt_tokens: --auto-truncate cuts what passes the tiny model's window)
        import httpx

        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", "--server", url, "--concurrency", "2",
                               "--requests", "8", "--route", "/embeddings", "--openai-model", name, "--json", str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["route"] == "/embeddings" and result["body_fields"] == {"model": name, "encoding_format": "base64"}
        done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", "--server", url, "--concurrency", "1",
                               "--requests", "2", "--route", "/no-such-route"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 2 and "answered 404 to the warm-up request" in done.stderr, done.stderr
    finally:
        server.terminate()
        server.communicate(timeout=30)
