"""A real `toolkit serve` process under hostile clients, and the CLI's first-run behaviour."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import serve_subprocess

TOOLKIT = [sys.executable, "-m", "toolkit.cli"]


def _serve(artifact, *args: str):
    return serve_subprocess(artifact, *args, ready="/health")


@pytest.fixture(scope="module")
def tiny_server(tiny_artifact):
    url, port, proc = _serve(tiny_artifact, "--read-timeout", "1", "--payload-limit", str(4 * 1024 * 1024))
    yield url, port
    proc.kill()


def test_a_huge_text_does_not_stall_health(tiny_server):
    url, _ = tiny_server
    huge = "word " * 700_000  # 3.5 MB
    result = {}

    def send():
        result["r"] = httpx.post(url + "/v1/embeddings", json={"input": huge, "truncate_prompt_tokens": -1}, timeout=60)

    worst = 0.0
    thread = threading.Thread(target=send)
    thread.start()
    while thread.is_alive():
        started = time.perf_counter()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - started)
        time.sleep(0.02)
    thread.join()
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["prompt_tokens"] == 96
    assert worst < 0.5, f"/health took {worst:.2f} s while a 3.5 MB text was embedded"


def test_stalled_connections_are_closed(tiny_server):
    _, port = tiny_server
    silent = socket.create_connection(("127.0.0.1", port))
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    for sock in (silent, slow):
        sock.settimeout(5)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 3
        sock.close()


def test_shutdown_past_the_grace_period_answers_503(minilm_artifact):
    url, _, proc = _serve(minilm_artifact, "--shutdown-grace", "1")
    texts = [f"text {i} " + "token " * 250 for i in range(1024)]  # ~260k tokens: many seconds on 2 cores
    result = {}

    def send():
        result["r"] = httpx.post(url + "/v1/embeddings", json={"input": texts, "truncate_prompt_tokens": -1}, timeout=60)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    proc.wait(timeout=30)
    r = result["r"]
    assert r.status_code == 503, r.text
    assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["code"] == 503


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLKIT, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def test_cli_first_run_friction():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("onnx-embed-toolkit ")
    help_text = _cli("export", "--help").stdout
    assert "[default: <model>[-<precision>].onnx]" in " ".join(help_text.split())  # not eaten as markup
    assert "--fp32-embedding-table" in help_text  # not cut at 80 columns
    for args, says in ((("serve", "x.onnx", "--log-level", "loud"), "--log-level must be one of"),
                       (("export", "--opset", "5"), "--opset must be between"),
                       (("export", "/nonexistent/model"), "no such artifact file or model directory"),
                       (("export", "bge-small-en-v1.5"), "is a bundled card, but BAAI/bge-small-en-v1.5's weights")):
        done = _cli(*args, env={"HF_HUB_OFFLINE": "1"})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert says in " ".join(done.stderr.split()), done.stderr
    cards = json.loads(_cli("cards", "--json").stdout)
    by_name = {c["name"]: c for c in cards}
    assert by_name["all-MiniLM-L6-v2"]["offline"] and not by_name["bge-small-en-v1.5"]["offline"]
    table = _cli("cards", env={"COLUMNS": ""}).stdout
    assert "snowflake-arctic-embed-m-v1.5" in table  # full names when piped (at COLUMNS=80 they fold to fit)


def test_serve_device_is_honoured(tiny_artifact):
    from toolkit.runtime.session import usable_devices
    from toolkit.settings import Device

    if Device.CUDA in usable_devices():
        pytest.skip("this machine has CUDA: the refusal below needs a machine without it")
    done = _cli("serve", str(tiny_artifact), "--device", "cuda")
    assert done.returncode == 2 and "device 'cuda' is not available here; available: cpu" in done.stderr


def test_log_level_warning_prints_no_info(tiny_artifact):
    url, _, proc = _serve(tiny_artifact)  # --log-level warning
    assert httpx.post(url + "/v1/embeddings", json={"input": "hello"}).status_code == 200
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"INFO" not in out, out.decode()[-1000:]


@pytest.mark.parametrize("args, said", [
    (("--device", "cpu", "--threads", "2"), "2 batch workers x 1 onnxruntime thread)"),  # the default on a CPU
    (("--device", "cpu", "--threads", "2", "--batch-workers", "1"), "1 batch worker x 2 onnxruntime threads)"),
])
def test_serve_splits_its_threads_among_batch_workers(tiny_artifact, tiny, args, said):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    url, _, proc = _serve(tiny_artifact, *args, "--log-level", "info")
    texts = [f"text {i} " + "more " * (i % 5) for i in range(16)]
    try:
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: client.post(url + "/v1/embeddings", json={"input": t}), texts))
        assert all(a.status_code == 200 for a in answers)
        got = np.array([a.json()["data"][0]["embedding"] for a in answers])
        np.testing.assert_allclose(got, tiny.embed(texts), atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert said in out.decode(), out.decode()[-1000:]


def test_batch_workers_below_one_is_refused(tiny_artifact):
    done = _cli("serve", str(tiny_artifact), "--batch-workers", "0")
    assert done.returncode == 2 and "--batch-workers" in done.stderr
