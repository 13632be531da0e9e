"""OpenAI's Batch API (/v1/files, /v1/batches) end to end: a real `toolkit serve --batch-dir` on 127.0.0.1, driven
by the official ``openai`` client; each line's answer is compared with the online route's answer to the same body,
and a server killed with SIGKILL mid-batch resumes it with every custom_id answered exactly once."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import app_client, serve_subprocess

KEY = "batch-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    """(url, openai client) of a server with the Batch API: files up to 1 MiB, batches up to 5000 lines."""
    folder = tmp_path_factory.mktemp("batches")
    url, _, proc = serve_subprocess(tiny_artifact, "--served-model-name", "tiny", "--api-key", KEY, "--batch-dir",
                                    str(folder), "--batch-max-file-mb", "1", "--batch-max-requests", "5000")
    try:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _upload(client: openai.OpenAI, lines: list) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return client.files.create(file=("requests.jsonl", text.encode()), purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        time.sleep(0.05)
    pytest.fail(f"batch {batch_id} did not finish within {timeout} s: {batch}")


def _results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    rows = [json.loads(line) for line in client.files.content(file_id).content.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id is answered twice"
    return by_id


def _run(client: openai.OpenAI, endpoint: str, lines: list):
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint=endpoint, completion_window="24h",
                                  metadata={"job": "test"})
    assert batch.status == "validating" and batch.metadata == {"job": "test"}
    return _wait(client, batch.id)


def _vectors(body: dict) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
                     else d["embedding"] for d in body["data"]])


def test_embeddings_lines_equal_the_online_answers(server):
    url, client = server
    bodies = [{"input": f"batch text number {i}", "model": "tiny"} for i in range(30)]
    bodies += [{"input": ["two", "inputs here"], "dimensions": 8}, {"input": "base64 please", "encoding_format": "base64"}]
    batch = _run(client, "/v1/embeddings", [_line(f"e{i}", "/v1/embeddings", b) for i, b in enumerate(bodies)])
    assert (batch.status, batch.request_counts.total, batch.request_counts.completed) == ("completed", 32, 32)
    assert batch.error_file_id is None and batch.in_progress_at and batch.finalizing_at and batch.completed_at
    results = _results(client, batch.output_file_id)
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    for i, body in enumerate(bodies):
        row = results[f"e{i}"]
        assert row["id"].startswith("batch_req_") and row["error"] is None
        assert row["response"]["status_code"] == 200 and row["response"]["request_id"]
        online = httpx.post(url + "/v1/embeddings", json=body, headers=AUTH).json()
        answer = row["response"]["body"]
        assert (answer["model"], answer["usage"], answer["object"]) == (online["model"], online["usage"], "list")
        np.testing.assert_allclose(_vectors(answer), _vectors(online), atol=1e-6)
    # the batch's usage: every answered line's input tokens (OpenAI's BatchUsage), as the online answers bill them
    billed = sum(results[f"e{i}"]["response"]["body"]["usage"]["prompt_tokens"] for i in range(len(bodies)))
    assert billed > 0 and (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (
        billed, 0, billed)
    metrics = httpx.get(url + "/metrics").text  # batch lines are counted apart from online requests
    assert 'toolkit_requests_total{route="/v1/embeddings (batch)",status="200"}' in metrics


def test_score_rerank_and_cohere_lines_equal_the_online_answers(server):
    url, client = server
    docs = ["ONNX Runtime executes graphs", "sunny weather today", "a graph of operators", "lunch"]
    work = {
        "/v1/score": [{"queries": f"query {i}", "documents": docs} for i in range(6)],
        "/v1/rerank": [{"query": f"run an ONNX graph {i}", "documents": docs, "top_n": 3} for i in range(6)],
        "/v2/embed": [{"texts": [f"hello {i}"], "input_type": "search_document", "embedding_types": ["float"]}
                      for i in range(3)],
    }
    batches = {endpoint: client.batches.create(input_file_id=_upload(client, [
        _line(f"x{i}", endpoint, body) for i, body in enumerate(bodies)]), endpoint=endpoint, completion_window="24h")
        for endpoint, bodies in work.items()}
    for endpoint, bodies in work.items():
        batch = _wait(client, batches[endpoint].id)
        assert (batch.status, batch.request_counts.completed) == ("completed", len(bodies)), batch
        results = _results(client, batch.output_file_id)
        for i, body in enumerate(bodies):
            answer = results[f"x{i}"]["response"]["body"]
            online = httpx.post(url + endpoint, json=body, headers=AUTH).json()
            if endpoint == "/v1/score":
                np.testing.assert_allclose([d["score"] for d in answer["data"]], [d["score"] for d in online["data"]],
                                           atol=1e-6)
            elif endpoint == "/v1/rerank":
                assert [r["index"] for r in answer["results"]] == [r["index"] for r in online["results"]]
                np.testing.assert_allclose([r["relevance_score"] for r in answer["results"]],
                                           [r["relevance_score"] for r in online["results"]], atol=1e-6)
            else:
                np.testing.assert_allclose(answer["embeddings"]["float"], online["embeddings"]["float"], atol=1e-6)
        billed = [results[f"x{i}"]["response"]["body"] for i in range(len(bodies))]
        billed = sum(b["meta"]["billed_units"]["input_tokens"] if "meta" in b else b["usage"]["prompt_tokens"]
                     for b in billed)
        assert billed > 0 and batch.usage.input_tokens == billed, (endpoint, batch.usage)


def test_bad_lines_are_their_own_errors_not_the_batch_failure(server):
    url, client = server
    endpoint = "/v1/embeddings"
    lines = [_line("good", endpoint, {"input": "fine"}), "{not json", json.dumps({"method": "POST", "url": endpoint,
             "body": {"input": "x"}}), {**_line("get", endpoint, {"input": "x"}), "method": "GET"},
             _line("elsewhere", "/v1/score", {"queries": "a", "documents": ["b"]}), _line("nobody", endpoint, []),
             _line("dims", endpoint, {"input": "x", "dimensions": 5}), _line("empty", endpoint, {"input": []}),
             _line("bytes", endpoint, {"input": "x", "encoding_format": "bytes"}), "", "   "]
    batch = _run(client, endpoint, lines)
    assert batch.status == "completed" and batch.request_counts.model_dump() == {"total": 9, "completed": 1, "failed": 8}
    assert set(_results(client, batch.output_file_id)) == {"good"}
    rows = [json.loads(line) for line in client.files.content(batch.error_file_id).content.splitlines()]
    codes = {(row["custom_id"], (row["error"] or {}).get("code")) for row in rows}
    assert codes >= {(None, "invalid_json_line"), (None, "missing_custom_id"), ("get", "invalid_method"),
                     ("elsewhere", "invalid_url"), ("nobody", "invalid_body"), ("bytes", "unsupported_response")}
    rejected = {row["custom_id"]: row["response"] for row in rows if row["response"] is not None}
    for custom_id, body in (("dims", {"input": "x", "dimensions": 5}), ("empty", {"input": []})):
        online = httpx.post(url + endpoint, json=body, headers=AUTH)
        assert rejected[custom_id]["status_code"] == online.status_code == 400
        assert rejected[custom_id]["body"] == online.json() and set(online.json()["error"]) == {"message", "type",
                                                                                                "param", "code"}


def test_request_errors_in_openai_shapes(server):
    url, client = server
    good = _upload(client, [_line("a", "/v1/embeddings", {"input": "x"})])
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.create(input_file_id="file-" + "0" * 24, endpoint="/v1/embeddings", completion_window="24h")
    assert missing.value.body["param"] == "input_file_id" and missing.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as wrong:
        client.batches.create(input_file_id=good, endpoint="/v1/chat/completions", completion_window="24h")
    assert wrong.value.body["param"] == "endpoint" and "/v1/embeddings" in wrong.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=good, endpoint="/v1/embeddings", completion_window="1h")
    with pytest.raises(openai.APIStatusError) as large:  # the server takes 1 MiB
        client.files.create(file=("big.jsonl", b"x" * (1024 * 1024 + 100_000)), purpose="batch")
    assert large.value.status_code == 413 and large.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    many = _upload(client, [_line(f"{i}", "/v1/embeddings", {"input": "x"}) for i in range(5001)])
    with pytest.raises(openai.BadRequestError, match="5001 requests"):
        client.batches.create(input_file_id=many, endpoint="/v1/embeddings", completion_window="24h")
    duplicated = client.batches.create(input_file_id=_upload(client, [_line("same", "/v1/embeddings", {"input": "a"}),
                                                                      _line("same", "/v1/embeddings", {"input": "b"})]),
                                       endpoint="/v1/embeddings", completion_window="24h")
    failed = _wait(client, duplicated.id)
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("duplicate_custom_id", 2, "custom_id")]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "f" * 24)
    for path in ("/v1/files/..%2F..%2Fetc%2Fpasswd/content", "/v1/files/file-..%2Fbatches/content"):
        answer = httpx.get(url + path, headers=AUTH)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == 404
    assert client.files.retrieve(good).filename == "requests.jsonl"
    assert good in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(many).deleted and many not in [f.id for f in client.files.list()]
    first = client.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    assert client.batches.list(limit=1, after=first.data[0].id).data[0].id != first.data[0].id


def test_the_api_key_guards_files_and_batches(server):
    url, client = server
    file_id = _upload(client, [_line("a", "/v1/embeddings", {"input": "x"})])
    stranger = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    for call in (stranger.files.list, stranger.batches.list, lambda: stranger.files.content(file_id),
                 lambda: stranger.files.create(file=("a.jsonl", b"{}\n"), purpose="batch"),
                 lambda: stranger.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                                 completion_window="24h")):
        with pytest.raises(openai.AuthenticationError):
            call()
    assert httpx.get(f"{url}/v1/files/{file_id}/content").status_code == 401


def test_a_cancelled_batch_stops_and_keeps_what_it_answered(server):
    _, client = server
    lines = [_line(f"c{i}", "/v1/embeddings", {"input": f"line {i} of a batch to cancel"}) for i in range(4000)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = _wait(client, batch.id)
    counts = batch.request_counts
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    assert 0 < counts.completed < counts.total == 4000 and counts.failed == 0
    answered = _results(client, batch.output_file_id)
    assert len(answered) == counts.completed and set(answered) <= {line["custom_id"] for line in lines}
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.batches.cancel(batch.id)


def test_a_killed_server_resumes_the_batch_answering_each_line_once(tiny_artifact, tmp_path):
    folder = tmp_path / "batches"
    lines = [_line(f"k{i}", "/v1/embeddings", {"input": f"line {i} survives a SIGKILL"}) for i in range(3000)]
    args = ("--served-model-name", "tiny", "--api-key", KEY, "--batch-dir", str(folder))
    url, _, proc = serve_subprocess(tiny_artifact, *args)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings",
                                      completion_window="24h")
        state, deadline = folder / "batches" / f"{batch.id}.json", time.monotonic() + 30
        while time.monotonic() < deadline:  # killed once some progress is committed
            record = json.loads(state.read_text())
            if record["progress"]["line"] > 0:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert record["batch"]["status"] == "in_progress" and 0 < record["progress"]["line"] < 3000
    partial = folder / "batches" / f"{batch.id}.output.jsonl"
    assert partial.stat().st_size >= record["progress"]["output_bytes"]
    url, _, proc = serve_subprocess(tiny_artifact, *args)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        batch = _wait(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 3000
        answered = _results(client, batch.output_file_id)  # fails on a custom_id answered twice
        assert set(answered) == {line["custom_id"] for line in lines}
        # the usage counts each answered line once across the restart
        assert batch.usage.input_tokens == sum(a["response"]["body"]["usage"]["prompt_tokens"]
                                               for a in answered.values())
        assert not any(Path(folder / "batches").glob("*.jsonl"))  # the partial files became the output file
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_without_batch_dir_the_paths_answer_404_saying_so(tiny_artifact):
    with app_client(tiny_artifact) as client:
        for method, path in (("GET", "/v1/batches"), ("POST", "/v1/files"), ("GET", "/v1/files/file-1/content")):
            answer = client.request(method, path)
            assert answer.status_code == 404 and "--batch-dir" in answer.json()["error"]["message"]


def test_files_and_outputs_expire_as_openai_says(server, tmp_path):
    """OpenAI's expires_after on files.create and output_expires_after on batches.create: the files get their
    expires_at, out-of-range values are OpenAI's 400, and an expired file is gone (an unfinished batch's input
    waits for its batch)."""
    url, client = server
    text = json.dumps(_line("a", "/v1/embeddings", {"input": "hello", "model": "tiny"})) + "\n"
    uploaded = client.files.create(file=("r.jsonl", text.encode()), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
    assert uploaded.expires_at == uploaded.created_at + 3600
    assert client.files.retrieve(uploaded.id).expires_at == uploaded.expires_at
    with pytest.raises(openai.BadRequestError, match="between 3600"):
        client.files.create(file=("r.jsonl", text.encode()), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 10})
    with pytest.raises(openai.BadRequestError, match="anchor must be 'created_at'"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                              extra_body={"output_expires_after": {"anchor": "now", "seconds": 3600}})
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})
    batch = _wait(client, batch.id)
    output = client.files.retrieve(batch.output_file_id)
    assert output.expires_at == output.created_at + 7200

    from toolkit.server.batch_store import BatchStore

    store = BatchStore(tmp_path)
    source = tmp_path / "uploads" / "x"
    source.write_text(text)
    kept = store.add_file(source, "r.jsonl", "batch", 1, expires_in=3600)
    source.write_text(text)
    busy = store.add_file(source, "r.jsonl", "batch", 1, expires_in=3600)
    from toolkit.server.batch_store import BatchProgress, BatchRecord, OpenAIBatch

    store.batches["batch_x"] = BatchRecord(OpenAIBatch(id="batch_x", endpoint="/v1/embeddings",
                                                       input_file_id=busy.file.id, completion_window="24h",
                                                       status="in_progress", created_at=0, expires_at=0),
                                           BatchProgress(), 0)
    assert store.drop_expired(now=time.time() + 60) == []
    assert store.drop_expired(now=time.time() + 3601) == [kept.file.id]  # the busy input waits for its batch
    with pytest.raises(Exception, match="no file with id"):
        store.file(kept.file.id)
    assert not store.content_path(kept.file.id).exists() and store.file(busy.file.id)
