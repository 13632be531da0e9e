"""``toolkit serve`` on Ray Serve, for real, on one machine: a local Ray with 2 CPUs, 1-CPU replicas behind Ray
Serve's HTTP proxy on loopback; every load loop bounded in count and time; Ray stopped at the end.

Two replicas answer the official OpenAI and Cohere clients and TEI's routes as a solo ``Embedder`` does; a
replica killed mid-load is replaced and costs only its in-flight requests; the deployment autoscales 1 -> 2 -> 1;
a re-deploy with another artifact drains without a failed request. (``toolkit serve --engine ray`` itself, up
and stopped by SIGTERM with exit 0, is the block of docs/scaling.md that tests/test_readme.py runs.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port

from toolkit.runtime import Embedder
from toolkit.settings import RuntimeOptions, ServerOptions

serve = pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")
from toolkit.server.ray import DEPLOYMENT, ScaleOptions, build_app  # noqa: E402

KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = [f"sentence {i} about replicas and proxies" + " more" * (i % 5) for i in range(64)]


@pytest.fixture(scope="module")
def ray_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-cache")


@pytest.fixture(scope="module")
def ray_proxy(ray_cache):
    """A local Ray (2 CPUs) with Ray Serve's proxy on a free loopback port; shut down after the module. Its
    workers' TOOLKIT_CACHE (where artifacts given by URI are copied) is the module's own folder."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"TOOLKIT_CACHE": str(ray_cache)}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _deploy(artifact: Path, scale: ScaleOptions, name: str = "tiny", **server) -> None:
    app = build_app([artifact], [name], ServerOptions(api_key=KEY, **server), RuntimeOptions(), scale)
    serve.run(app, name=DEPLOYMENT, route_prefix="/")


def _replicas() -> int:
    status = serve.status().applications[DEPLOYMENT].deployments[DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


def _embed(url: str, texts: list[str], timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": texts, "model": "tiny"}, headers=AUTH, timeout=timeout)


def _load(url: str, expected: np.ndarray, seconds: float, clients: int = 4, limit: int = 400,
          stop: threading.Event | None = None) -> list[tuple[int, bool]]:
    """``clients`` threads posting single texts for ``seconds`` (at most ``limit`` requests each, until ``stop``
    is set): (status, whether a 200's vector equals the solo one) per request."""
    deadline = time.monotonic() + seconds

    def worker(k: int) -> list[tuple[int, bool]]:
        out = []
        with httpx.Client(timeout=30, headers=AUTH) as http:
            for n in range(limit):
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    break
                i = (k * 7 + n) % len(TEXTS)
                try:
                    r = http.post(url + "/v1/embeddings", json={"input": TEXTS[i], "model": "tiny"})
                except httpx.HTTPError:
                    out.append((0, False))
                    continue
                ok = r.status_code == 200 and np.allclose(r.json()["data"][0]["embedding"], expected[i], atol=1e-6)
                out.append((r.status_code, ok))
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [row for rows in pool.map(worker, range(clients)) for row in rows]


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_two_replicas_answer_every_dialect_as_a_solo_embedder(ray_proxy, tiny_artifact, tiny):
    import cohere
    from openai import AuthenticationError, OpenAI

    _deploy(tiny_artifact, ScaleOptions(replicas=2))
    assert _replicas() == 2
    client = OpenAI(base_url=ray_proxy + "/v1", api_key=KEY, max_retries=0)
    response = client.embeddings.create(model="tiny", input=TEXTS[:8], encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in response.data]), tiny.embed(TEXTS[:8]), atol=1e-6)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=ray_proxy + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="tiny", input="x")
    co = cohere.ClientV2(api_key=KEY, base_url=ray_proxy)
    embedded = co.embed(texts=TEXTS[:4], model="tiny", input_type="search_query", embedding_types=["float"])
    np.testing.assert_allclose(np.array(embedded.embeddings.float_), tiny.embed(TEXTS[:4], prompt_name="query"),
                               atol=1e-6)
    documents = TEXTS[10:15]
    reranked = co.rerank(model="tiny", query=TEXTS[0], documents=documents, top_n=3)
    scores = tiny.score(TEXTS[0], documents)
    assert [r.index for r in reranked.results] == np.argsort(-scores)[:3].tolist()
    np.testing.assert_allclose([r.relevance_score for r in reranked.results], np.sort(scores)[::-1][:3], atol=1e-6)
    r = httpx.post(ray_proxy + "/embed", json={"inputs": TEXTS[:3]}, headers=AUTH)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), tiny.embed(TEXTS[:3]), atol=1e-6)
    r = httpx.post(ray_proxy + "/rerank", json={"query": TEXTS[0], "texts": documents}, headers=AUTH)
    assert r.status_code == 200, r.text
    by_index = {row["index"]: row["score"] for row in r.json()}
    np.testing.assert_allclose([by_index[i] for i in range(len(documents))], scores, atol=1e-6)
    assert httpx.post(ray_proxy + "/embed", json={"inputs": "x"}).status_code == 401
    assert httpx.get(ray_proxy + "/ready").status_code == 200
    # both replicas answered: each response names the replica's process in no header, so count Ray's own view
    assert _replicas() == 2


def test_the_batch_api_on_ray_one_record_lines_answered_by_the_replicas(ray_proxy, tiny_artifact, tiny, tmp_path):
    """--batch-dir on Ray Serve: the files and batches live in one batch deployment whichever replica a request
    reaches; the lines go back to the two replicas; the official client reads the results, equal to online."""
    import json

    from openai import NotFoundError, OpenAI

    _deploy(tiny_artifact, ScaleOptions(replicas=2), batch_dir=str(tmp_path / "batches"))
    client = OpenAI(base_url=ray_proxy + "/v1", api_key=KEY, max_retries=0)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"input": TEXTS[i], "model": "tiny"}} for i in range(24)]
    uploaded = client.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()),
                                   purpose="batch")
    assert [f.id for f in client.files.list()] == [uploaded.id]  # one record, whichever replica lists it
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    _wait(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"), 90, "the batch")
    batch = client.batches.retrieve(batch.id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 24, 0)
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).content.splitlines()]
    got = {row["custom_id"]: row["response"]["body"]["data"][0]["embedding"] for row in rows}
    np.testing.assert_allclose([got[f"r{i}"] for i in range(24)], tiny.embed(TEXTS[:24]), atol=1e-6)
    assert batch.usage.input_tokens == sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
    with pytest.raises(NotFoundError):
        client.files.retrieve("file-" + "0" * 24)
    assert httpx.get(ray_proxy + "/v1/files", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_killed_replica_is_replaced_and_costs_only_its_in_flight_requests(ray_proxy, tiny_artifact, tiny):
    import ray

    _deploy(tiny_artifact, ScaleOptions(replicas=2, health_check_period_s=1.0))
    expected = tiny.embed(TEXTS)
    results: list[tuple[int, bool]] = []
    stop = threading.Event()
    loader = threading.Thread(target=lambda: results.extend(_load(ray_proxy, expected, seconds=30, stop=stop)))
    loader.start()
    time.sleep(3)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "SERVE_REPLICA" in a["name"] and DEPLOYMENT in a["name"]]
    assert len(victims) == 2, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    _wait(lambda: _replicas() == 2 and time.monotonic() - killed_at > 2, 60, "the replacement replica")
    replaced_at = time.monotonic()
    time.sleep(1)
    stop.set()
    loader.join(timeout=60)
    after = _load(ray_proxy, expected, seconds=3, clients=2)
    failed = [status for status, ok in results if status != 200]
    print(f"killed one of 2 replicas: {len(results)} requests, failed {failed}, replaced in {replaced_at - killed_at:.1f} s")
    assert all(ok for status, ok in results if status == 200)  # every answer that came back is right
    assert all(status >= 500 or status == 0 for status in failed), failed  # failures are 5xx (retryable), no 4xx
    assert len(failed) <= 8, failed  # at most what was in flight on the killed replica (4 clients)
    assert after and all(status == 200 and ok for status, ok in after)  # none after the replacement is up
    assert replaced_at - killed_at < 60


def test_autoscaling_goes_up_under_load_and_back_down(ray_proxy, tiny_artifact, tiny):
    scale = ScaleOptions(replicas=None, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                         upscale_delay_s=0.5, downscale_delay_s=2.0, look_back_period_s=1.0)
    _deploy(tiny_artifact, scale)
    assert _replicas() == 1
    expected = tiny.embed(TEXTS)
    results: list[tuple[int, bool]] = []
    stop = threading.Event()
    loader = threading.Thread(target=lambda: results.extend(_load(ray_proxy, expected, seconds=40, clients=6,
                                                                  stop=stop)))
    loader.start()
    try:
        _wait(lambda: _replicas() == 2, 40, "a second replica under load")
        time.sleep(2)  # both replicas answer for a while
    finally:
        stop.set()
        loader.join(timeout=90)
    assert results and all(status == 200 and ok for status, ok in results)
    _wait(lambda: _replicas() == 1, 60, "the scale-down once the load stopped")
    r = _embed(ray_proxy, TEXTS[:2])
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], expected[:2], atol=1e-6)


def test_a_redeploy_with_another_artifact_drains_without_failed_requests(ray_proxy, tiny_artifact, tiny,
                                                                        tiny_decoder_artifact):
    _deploy(tiny_artifact, ScaleOptions(replicas=1))
    old = tiny.embed(TEXTS)
    new = Embedder(tiny_decoder_artifact, device="cpu").embed(TEXTS)
    statuses: list[int] = []
    sources: list[str] = []
    stop = time.monotonic() + 30

    def client() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as http:
            for n in range(300):
                if time.monotonic() > stop or (len(sources) > 5 and sources[-5:] == ["new"] * 5):
                    break
                i = n % len(TEXTS)
                r = http.post(ray_proxy + "/v1/embeddings", json={"input": TEXTS[i], "model": "tiny"})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    v = np.array(r.json()["data"][0]["embedding"])
                    sources.append("old" if v.shape == old[i].shape and np.allclose(v, old[i], atol=1e-6) else
                                   "new" if v.shape == new[i].shape and np.allclose(v, new[i], atol=1e-6) else "wrong")

    loader = threading.Thread(target=client)
    loader.start()
    time.sleep(1)
    _deploy(tiny_decoder_artifact, ScaleOptions(replicas=1))  # the same name, another artifact: a rolling update
    loader.join(timeout=90)
    assert statuses and set(statuses) == {200}, statuses
    assert "wrong" not in sources and sources[0] == "old" and sources[-1] == "new"


def test_without_ray_serve_the_engine_is_one_line_and_exit_2(tiny_artifact, tmp_path):
    """A machine without the [serve] extra: ``--engine ray`` names the extra, exit 2, no traceback."""
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    run = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", str(tiny_artifact), "--engine", "ray"],
                         capture_output=True, text=True, timeout=120, env={**_env(), "PYTHONPATH": str(blocker)})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "pip install 'onnx-embed-toolkit[serve]'" in run.stderr and "Traceback" not in run.stderr


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_three_models_two_per_replica_each_answered_by_the_model_it_names(ray_proxy, ray_cache, tiny_artifact, tiny,
                                                                         tiny_decoder_artifact, cross_encoder_artifact):
    """Ray Serve's multiplexing by the body's ``model``: one replica holding at most two of three artifacts (one
    of them given by a ``file://`` URI, copied into the node's cache); each answer equals its model's solo
    answer, and a third model closes the least recently used one."""
    paths = [tiny_artifact, tiny_decoder_artifact.as_uri(), cross_encoder_artifact]
    app = build_app(paths, ["tiny", "decoder", "reranker"], ServerOptions(api_key=KEY), RuntimeOptions(),
                    ScaleOptions(replicas=1, models_per_replica=2))
    serve.run(app, name=DEPLOYMENT, route_prefix="/")
    decoder, reranker = Embedder(tiny_decoder_artifact, device="cpu"), Embedder(cross_encoder_artifact, device="cpu")
    documents = TEXTS[20:24]

    def ask(model: str) -> None:
        if model == "reranker":
            r = httpx.post(ray_proxy + "/v1/rerank", json={"model": model, "query": TEXTS[0], "documents": documents},
                           headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            by_index = {row["index"]: row["relevance_score"] for row in r.json()["results"]}
            np.testing.assert_allclose([by_index[i] for i in range(4)], reranker.score(TEXTS[0], documents), atol=1e-6)
        else:
            r = httpx.post(ray_proxy + "/v1/embeddings", json={"model": model, "input": TEXTS[:3]}, headers=AUTH,
                           timeout=60)
            assert r.status_code == 200 and r.json()["model"] == model, r.text
            solo = (tiny if model == "tiny" else decoder).embed(TEXTS[:3])
            np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], solo, atol=1e-6)

    def open_models() -> list[str]:
        return httpx.get(ray_proxy + "/ready", headers=AUTH).json()["models"]

    ask("tiny")
    ask("decoder")
    assert sorted(open_models()) == ["decoder", "tiny"]
    assert [p.name for p in ray_cache.glob("remote/*/*.onnx")] == [tiny_decoder_artifact.name]
    ask("reranker")  # a third: the least recently used (tiny) is closed
    assert sorted(open_models()) == ["decoder", "reranker"]
    ask("tiny")
    assert sorted(open_models()) == ["reranker", "tiny"]
    for model in ("decoder", "tiny", "reranker", "reranker", "decoder"):
        ask(model)
    r = httpx.post(ray_proxy + "/v1/embeddings", json={"model": "nope", "input": "x"}, headers=AUTH)
    assert r.status_code == 404 and "served: tiny, decoder, reranker" in r.json()["error"]["message"]
    r = httpx.post(ray_proxy + "/v1/embeddings", content=b"{not json", headers=AUTH)
    assert r.status_code == 400
    assert httpx.post(ray_proxy + "/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 401
    r = httpx.post(ray_proxy + "/v1/embeddings", content=b"x" * (3 * 1024 * 1024), headers=AUTH)
    assert r.status_code == 413
    deep = b"[" * 10_000 + b"]" * 10_000
    for hostile in (b'{"model": "tiny", "input": ' + deep + b"}", b'{"model": "tiny", "input": "\xff\xfe"}'):
        r = httpx.post(ray_proxy + "/v1/embeddings", content=hostile, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), r.text  # the app's answer, not the router's 500
    assert httpx.get(ray_proxy + "/health").status_code == 200
    ask("tiny")  # and everything keeps answering



@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "0"], "--replicas must be at least 1 (got 0)"),
    (["--min-replicas", "2", "--max-replicas", "1"], "--max-replicas must be at least 1 and at least --min-replicas"),
    (["--replicas", "3", "--max-replicas", "4"], "give one form"),
    (["--models-per-replica", "0"], "--models-per-replica must be at least 1"),
    (["--uds-path", "/tmp/x.sock"], "--uds-path is not available with --engine ray"),
    (["--read-timeout", "3"], "--read-timeout is not available with --engine ray"),
    (["--engine", "rey"], "--engine must be one of: local, ray (got rey)"),
])
def test_engine_ray_flags_are_checked_before_anything_starts(tiny_artifact, flags, message):
    from typer.testing import CliRunner

    from toolkit.cli import app

    engine = [] if "--engine" in flags else ["--engine", "ray"]
    result = CliRunner().invoke(app, ["serve", str(tiny_artifact), *engine, *flags])
    assert result.exit_code == 2 and message in result.output, result.output


def test_replica_flags_without_engine_ray_are_refused(tiny_artifact):
    from typer.testing import CliRunner

    from toolkit.cli import app

    result = CliRunner().invoke(app, ["serve", str(tiny_artifact), "--replicas", "2"])
    assert result.exit_code == 2 and "go with --engine ray" in result.output, result.output


def test_the_multiplexing_router_reads_a_model_from_any_body_without_failing():
    """The ingress only peeks at ``model``: a hostile body (nested 10,000 deep, invalid UTF-8, not an object, a
    number) is no model, so the app behind it answers in its dialect's words (a 400), never the router a 500."""
    from toolkit.server.ray_multiplex import _model_of

    deep = b"[" * 10_000 + b"]" * 10_000
    assert _model_of(b'{"model": "tiny", "input": "x"}') == "tiny"
    for body in (deep, b'{"model": "a", "input": ' + deep + b"}", b'{"model": "\xff\xfe"}', b"[1, 2]",
                 b'{"model": 5}', b"", b"\x00\x01"):
        assert _model_of(body) is None, body[:40]
