"""LoRA adapters on one base artifact (``toolkit export BASE --adapter NAME=DIR``), picked per request.

Tiny random models with two PEFT LoRA adapters each (made here with ``peft``, B initialised at random so an
adapter changes the answer): every adapter's vectors equal PEFT's own model, the base's the base model's; the
server serves each adapter under its own name, on one batcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _export, serve_subprocess
from tiny_models import add_lora_adapters, build_tiny_model

from toolkit.errors import ConfigError, RequestError
from toolkit.runtime import Embedder

TARGETS = {"bert": (["query", "value"], ["key", "dense"]), "xlm-roberta": (["query", "value"], ["key", "dense"]),
           "qwen3": (["q_proj", "v_proj"], ["k_proj", "down_proj"])}
TEXTS = ["hello world", "a somewhat longer sentence about adapters and the base they share", "x"]


def _adapters(folder: Path, model_type: str) -> dict[str, Path]:
    """Two PEFT LoRA adapters of the model in ``folder``: 'one' (r=4, alpha 8, rsLoRA) and 'two' (r=2, alpha 4)."""
    first, second = TARGETS[model_type]
    return add_lora_adapters(folder, {"one": {"r": 4, "lora_alpha": 8, "target_modules": first, "use_rslora": True},
                                      "two": {"r": 2, "lora_alpha": 4, "target_modules": second}})


def _peft_vectors(folder: Path, adapters: dict[str, Path], adapter: str | None, texts: list[str], *,
                  last_token: bool) -> np.ndarray:
    """PEFT's own model (adapter active; None: the base model alone), pooled as the card says, normalized."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapters[adapter]), adapter_name=adapter).eval()
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding to account for
            batch = tokenizer([text], return_tensors="pt")
            states = model(**batch).last_hidden_state[0]
            rows.append(states[-1] if last_token else states.mean(0))
    vectors = torch.stack(rows).numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory):
    """(the artifact, the model folder, the adapter folders): tiny BERT exported with adapters 'one' and 'two'."""
    root = tmp_path_factory.mktemp("lora-bert")
    folder = build_tiny_model("bert", root / "model")
    adapters = _adapters(folder, "bert")
    result = _export(str(folder), root / "base.onnx", pooling="mean",
                     adapters=tuple(f"{name}={path}" for name, path in adapters.items()))
    return result, folder, adapters


def _check_against_peft(artifact: Path, folder: Path, adapters: dict[str, Path], *, last_token: bool) -> None:
    emb = Embedder(artifact, device="cpu")
    assert set(emb.adapters) == {"one", "two"}
    answers = {}
    for adapter in (None, "one", "two"):
        got = emb.embed(TEXTS, adapter=adapter)
        expected = _peft_vectors(folder, adapters, adapter, TEXTS, last_token=last_token)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"adapter {adapter}")
        answers[adapter] = got
    # the adapters change the answer (so the checks above could fail), each its own way
    assert np.abs(answers["one"] - answers[None]).max() > 1e-3
    assert np.abs(answers["two"] - answers["one"]).max() > 1e-3
    # Embedder(adapter=...) is every call's default; adapter=None a call's way back to the base
    picked = Embedder(artifact, device="cpu", adapter="two")
    np.testing.assert_array_equal(picked.embed(TEXTS), answers["two"])
    np.testing.assert_array_equal(picked.embed(TEXTS, adapter=None), answers[None])


def test_bert_adapters_equal_peft_and_the_base_the_base_model(bert_adapters):
    result, folder, adapters = bert_adapters
    _check_against_peft(result.path, folder, adapters, last_token=False)


@pytest.mark.parametrize("model_type", ["xlm-roberta", "qwen3"])
def test_xlmr_and_decoder_adapters_equal_peft(model_type, tmp_path):
    folder = build_tiny_model(model_type, tmp_path / "model")
    adapters = _adapters(folder, model_type)
    decoder = model_type == "qwen3"
    result = _export(str(folder), tmp_path / "base.onnx", pooling="last_token" if decoder else "mean",
                     adapters=tuple(f"{name}={path}" for name, path in adapters.items()))
    _check_against_peft(result.path, folder, adapters, last_token=decoder)


def test_the_manifest_lists_each_adapter_verified_and_its_file_beside(bert_adapters):
    result, _, adapters = bert_adapters
    specs = {spec.name: spec for spec in result.manifest.adapters}
    assert list(specs) == ["one", "two"]
    assert specs["one"].rank == 4 and specs["two"].rank == 2 and specs["one"].alpha == 8.0
    assert all(spec.passed and min(spec.min_cosine.values()) >= 0.99999 for spec in specs.values())
    assert all(target.endswith((".query", ".value")) for target in specs["one"].targets)
    # BERT's pooler is adapted by 'two' ("dense") but no output reads it: its slot was pruned with it
    assert not any("pooler" in target for target in specs["two"].targets)
    assert any(target.endswith("attention.output.dense") for target in specs["two"].targets)
    for name in specs:
        file = result.path.with_name(f"base.adapter.{name}.onnx_adapter")
        assert file.is_file() and file.stat().st_size < result.path.stat().st_size / 10  # its own weights only
    emb = Embedder(result.path, device="cpu")
    assert emb.adapters["one"].size == specs["one"].parameters


def test_unknown_adapters_and_unfit_files_are_clear_errors(bert_adapters, tmp_path, tiny_artifact):
    result, _, _ = bert_adapters
    with pytest.raises(ConfigError, match="adapter 'nope' is not one of this model's: one, two"):
        Embedder(result.path, device="cpu", adapter="nope")
    emb = Embedder(result.path, device="cpu")
    with pytest.raises(RequestError, match="not one of this model's: one, two"):
        emb.embed(["x"], adapter="three")
    one = result.path.with_name("base.adapter.one.onnx_adapter")
    # an adapter file for an artifact without slots, a file that is no adapter, a name given twice
    from toolkit.settings import RuntimeOptions

    with pytest.raises(ConfigError, match="exported with LoRA slots"):
        Embedder(tiny_artifact, options=RuntimeOptions(device="cpu", adapters=(f"one={one}",)))
    bogus = tmp_path / "bogus.onnx_adapter"
    bogus.write_bytes(b"not an adapter")
    with pytest.raises(ConfigError, match="not an onnxruntime adapter file"):
        Embedder(result.path, options=RuntimeOptions(device="cpu", adapters=(f"bad={bogus}",)))
    with pytest.raises(ConfigError, match="given twice"):
        Embedder(result.path, options=RuntimeOptions(device="cpu", adapters=(f"one={one}",)))


def test_export_refuses_what_a_slot_cannot_hold(tmp_path, bert_adapters):
    _, folder, adapters = bert_adapters
    config = json.loads((adapters["one"] / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    shutil.copytree(adapters["one"], dora)
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA cannot be served"):
        _export(str(folder), tmp_path / "a.onnx", pooling="mean", adapters=(f"d={dora}",))
    with pytest.raises(ConfigError, match="int8 is not supported"):
        _export(str(folder), tmp_path / "a.onnx", pooling="mean", precision="int8", adapters=(f"one={adapters['one']}",))
    with pytest.raises(ConfigError, match="give NAME=DIR"):
        _export(str(folder), tmp_path / "a.onnx", pooling="mean", adapters=(str(adapters["one"]),))
    cli = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(folder), "--pooling", "mean",
                          "--adapter", f"x={tmp_path / 'missing'}", "-o", str(tmp_path / "b.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "no such folder" in cli.stderr and "Traceback" not in cli.stderr


def test_one_batcher_serves_every_adapter_each_request_its_own_answer(bert_adapters):
    """Requests for the base and both adapters at once: batches hold one adapter's rows, answers stay apart."""
    from toolkit.runtime.async_embedder import AsyncEmbedder

    result, _, _ = bert_adapters
    emb = Embedder(result.path, device="cpu")
    expected = {name: emb.embed(TEXTS, adapter=name) for name in (None, "one", "two")}
    batches = []
    engine = AsyncEmbedder(emb, on_batch=batches.append)
    views = {None: engine, "one": engine.for_adapter("one"), "two": engine.for_adapter("two")}

    async def all_at_once():
        calls = [(name, i) for i in range(len(TEXTS)) for name in views] * 3
        answers = await asyncio.gather(*(views[name].embed([TEXTS[i]]) for name, i in calls))
        return calls, answers

    try:
        calls, answers = asyncio.run(all_at_once())
    finally:
        engine.close()
    for (name, i), (vectors, _) in zip(calls, answers):
        np.testing.assert_allclose(vectors[0], expected[name][i], atol=1e-6, err_msg=f"adapter {name}, text {i}")
    assert len(batches) < len(calls)  # they were batched (each batch one adapter's), not run one by one


def test_the_server_serves_each_adapter_by_name(bert_adapters, tmp_path):
    """A real `toolkit serve` with the artifact's adapters and one more given as --lora-modules (vLLM's form):
    /v1/models lists them with their parent; the openai client gets each adapter's vectors by model name;
    an unknown name is the usual 404."""
    import httpx
    import openai

    result, _, _ = bert_adapters
    extra = tmp_path / "three.onnx_adapter"
    shutil.copyfile(result.path.with_name("base.adapter.two.onnx_adapter"), extra)
    url, _, proc = serve_subprocess(result.path, "--served-model-name", "base", "--lora-modules", f"three={extra}")
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert set(models) == {"base", "one", "two", "three"}
        assert models["base"]["parent"] is None and models["base"]["adapters"] == ["one", "two", "three"]
        assert models["one"]["parent"] == "base" and models["three"]["root"] == str(extra)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        emb = Embedder(result.path, device="cpu")

        def ask(name):
            data = client.embeddings.create(model=name, input=TEXTS).data
            return name, np.array([d.embedding for d in data])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, ["base", "one", "two", "three"] * 3))
        for name, vectors in answers:
            expected = emb.embed(TEXTS, adapter={"base": None, "three": "two"}.get(name, name))
            np.testing.assert_allclose(vectors, expected, atol=1e-5, err_msg=name)
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="four", input=["x"])
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_toolkit_embed_writes_the_adapters_vectors(bert_adapters, tmp_path):
    import pyarrow.parquet as pq

    result, _, _ = bert_adapters
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "embed", str(result.path), str(tmp_path / "in.txt"),
                           "-o", str(tmp_path / "out"), "--adapter", "two"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).sort_by("row")
    expected = Embedder(result.path, device="cpu").embed(TEXTS, adapter="two")
    np.testing.assert_allclose(np.array(table["embedding"].to_pylist()), expected, atol=1e-6)
    wrong = subprocess.run([sys.executable, "-m", "toolkit.cli", "embed", str(result.path), str(tmp_path / "in.txt"),
                            "-o", str(tmp_path / "out2"), "--adapter", "nope"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "not one of this model's: one, two" in wrong.stderr + wrong.stdout


def test_adapters_load_and_unload_at_run_time_only_when_allowed(bert_adapters, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: absent by default; with the flag, an adapter file
    becomes a served name at once and stops being one, with vLLM's status codes."""
    from conftest import app_client

    result, _, _ = bert_adapters
    two = result.path.with_name("base.adapter.two.onnx_adapter")
    body = {"lora_name": "three", "lora_path": str(two)}
    with app_client(result.path, names=("base",)) as client:
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 404
    expected = Embedder(result.path, device="cpu").embed(TEXTS, adapter="two")
    with app_client(result.path, names=("base",), allow_runtime_lora_updating=True) as client:
        assert client.post("/v1/embeddings", json={"model": "three", "input": TEXTS}).status_code == 404
        loaded = client.post("/v1/load_lora_adapter", json=body)
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'three' added successfully."
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["three"]["parent"] == "base" and "three" in models["base"]["adapters"]
        vectors = client.post("/v1/embeddings", json={"model": "three", "input": TEXTS}).json()["data"]
        np.testing.assert_allclose([d["embedding"] for d in vectors], expected, atol=1e-5)
        again = client.post("/v1/load_lora_adapter", json=body)
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        assert client.post("/v1/load_lora_adapter", json={**body, "load_inplace": True}).status_code == 200
        missing = client.post("/v1/load_lora_adapter", json={"lora_name": "four", "lora_path": str(tmp_path / "x")})
        assert missing.status_code == 404
        (tmp_path / "bogus.onnx_adapter").write_bytes(b"nope")
        bogus = client.post("/v1/load_lora_adapter", json={"lora_name": "four",
                                                           "lora_path": str(tmp_path / "bogus.onnx_adapter")})
        assert bogus.status_code == 400 and "not an onnxruntime adapter file" in bogus.json()["error"]["message"]
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": str(two)}).status_code == 400
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "five"}).status_code == 400
        unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "three"})
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'three' removed successfully."
        assert client.post("/v1/embeddings", json={"model": "three", "input": TEXTS}).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "three"}).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "base"}).status_code == 404
        assert client.post("/v1/embeddings", json={"model": "one", "input": TEXTS}).status_code == 200
        # hostile bodies: each a 4xx in the usual shape, the server answering on
        json_headers = {"content-type": "application/json"}
        for body in (b"[" * 10_000 + b"]" * 10_000, b'{"lora_name": "\xff\xfe", "lora_path": "x"}',
                     b'{"lora_name": "' + b"a" * 3_000_000 + b'", "lora_path": "x"}',
                     b'{"lora_name": "six", "lora_path": "' + str(result.path).encode() + b'"}'):
            for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                answer = client.post(route, content=body, headers=json_headers)
                assert 400 <= answer.status_code < 500, (route, answer.status_code, answer.text[:200])
            assert client.get("/health").status_code == 200
        assert "six" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_bound_runs_get_the_adapter_too(bert_adapters):
    """onnxruntime applies no active adapter to an IO-binding run (CUDA's default path): a run with an adapter is a
    plain run there, and gives the same vectors."""
    result, _, _ = bert_adapters
    plain = Embedder(result.path, device="cpu")
    bound = Embedder(result.path, device="cpu", io_binding=True)
    for adapter in (None, "one", "two"):
        np.testing.assert_allclose(bound.embed(TEXTS, adapter=adapter), plain.embed(TEXTS, adapter=adapter), atol=1e-6)
