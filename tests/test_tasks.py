"""The task table (runtime/tasks.py) and the manifest's head: what an artifact is, recorded at export."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from toolkit.errors import ConfigError, RequestError
from toolkit.manifest import HeadSpec, Manifest, decode_manifest, encode_manifest
from toolkit.runtime import AsyncEmbedder, Embedder
from toolkit.runtime.tasks import TASKS, task_for


def test_the_exporter_records_the_head(tiny_artifact, splade_artifact, cross_encoder_artifact, clip_artifact):
    expected = {
        tiny_artifact: ("dense", ["embed", "token_embed", "score"], "token_embeddings", False, ["text"]),
        splade_artifact: ("sparse", ["embed_sparse"], None, False, ["text"]),
        cross_encoder_artifact: ("classifier", ["score", "classify"], None, True, ["text"]),
        clip_artifact: ("towers", ["embed", "score"], None, False, ["text", "image"]),
    }
    for artifact, (name, tasks, token_output, pairs, modalities) in expected.items():
        emb = Embedder(artifact, device="cpu")
        head = emb.manifest.head
        assert head is not None, artifact  # recorded, not inferred
        assert (head.name, head.tasks, head.token_output, head.pairs, head.modalities) == \
            (name, tasks, token_output, pairs, modalities)
        assert emb.tasks == tuple(tasks) and emb.cross_encoder is pairs and emb.modalities == tuple(modalities)


def test_a_format_1_manifest_is_still_read(tiny_artifact, splade_artifact, cross_encoder_artifact, clip_artifact):
    """Artifacts written before the head was recorded: the same head is told from their outputs and card."""
    for artifact in (tiny_artifact, splade_artifact, cross_encoder_artifact, clip_artifact):
        manifest = Embedder(artifact, device="cpu").manifest
        old = msgspec.json.decode(encode_manifest(manifest))
        old.pop("head")
        old["format_version"] = 1
        legacy = decode_manifest(msgspec.json.encode(old).decode())
        assert legacy.head is None and legacy.head_spec == manifest.head


def test_a_newer_format_says_upgrade_before_anything_else(tiny_artifact):
    """A manifest from a newer toolkit may hold keys this one does not know: the answer is to upgrade, not a list
    of unknown keys; a format-2 manifest (written before the head declared its encoders) still reads as it did."""
    manifest = Embedder(tiny_artifact, device="cpu").manifest
    newer = {**msgspec.json.decode(encode_manifest(manifest)), "format_version": 99, "a_new_key": 1}
    with pytest.raises(ConfigError, match=r"manifest format 99 is newer than this toolkit reads .*upgrade"):
        decode_manifest(msgspec.json.encode(newer).decode())
    format_2 = msgspec.json.decode(encode_manifest(manifest))
    format_2["format_version"] = 2
    format_2["head"].pop("encoders")
    assert decode_manifest(msgspec.json.encode(format_2).decode()).encoders == {"text": "text"}


def test_the_engines_share_each_recipe(tiny_artifact, cross_encoder_artifact):
    """Each table entry gives the same result, and the same error, through both engines."""
    emb = Embedder(tiny_artifact, device="cpu")
    engine = AsyncEmbedder(emb)
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    try:
        sync = emb.perform("embed", texts, dimensions=8)
        batched, prepared = asyncio.run(engine.perform("embed", texts, dimensions=8))
        np.testing.assert_allclose(batched, sync, atol=1e-6)
        assert prepared.tokens == sum(len(t) for t in emb.tokenize_inputs(texts))
        ranked = emb.perform("rerank", "alpha", texts, top_n=2)
        assert asyncio.run(engine.rerank("alpha", texts, top_n=2))[0] == ranked and len(ranked) == 2
        for call in (lambda: emb.perform("classify", texts),
                     lambda: asyncio.run(engine.perform("classify", texts))):
            with pytest.raises(RequestError, match="does not answer 'classify'; it answers: embed, token_embed, score"):
                call()
        with pytest.raises(RequestError, match="task 'nope' is not one of: embed, "):
            emb.perform("nope", texts)
    finally:
        engine.close()
    ce = Embedder(cross_encoder_artifact, device="cpu")
    assert set(TASKS) >= {"embed", "embed_images", "embed_mixed", "token_embed", "embed_sparse", "classify", "score",
                          "rerank"}
    np.testing.assert_allclose(ce.perform("score", "q", ["a", "b"]), ce.score("q", ["a", "b"]))
    assert task_for("score").param == "documents"


def test_head_spec_is_strict():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "dense", "label": "x", "tasks": [], "surprise": 1}, HeadSpec)
    assert "head" in Manifest.__struct_fields__


def _toy_mean(emb, inputs, **tokenize):
    """A toy task: the mean of the sentence output and the raw (un-normalized) one, per input."""
    from toolkit.runtime.tasks import Prepared, Run

    items = emb.tokenize_inputs(inputs, **tokenize)
    return Prepared([Run(items, "sentence_embedding"), Run(items, "sentence_embedding_raw")],
                    lambda rows: (np.stack(rows[0]) + np.stack(rows[1])) / 2, tokens=sum(len(t) for t in items))


@pytest.fixture
def toy_task(monkeypatch):
    """A new task, registered in ONE place: nothing else in the code base knows its name."""
    from toolkit.runtime import tasks

    monkeypatch.setitem(tasks.TASKS, "toy_mean", tasks.Task("toy_mean", _toy_mean, base="embed",
                                                            rows=lambda emb, result: list(result)))
    return "toy_mean"


def test_a_new_task_runs_everywhere_from_one_registration(toy_task, tiny_artifact, tmp_path):
    from litestar.testing import TestClient

    from toolkit.server.app import create_app, load_models
    from toolkit.server.metrics import Metrics
    from toolkit.settings import RuntimeOptions, ServerOptions

    texts = ["alpha beta", "gamma delta epsilon"]
    emb = Embedder(tiny_artifact, device="cpu")
    expected = (emb.embed(texts) + emb.embed(texts, normalize=False)) / 2
    np.testing.assert_allclose(emb.perform(toy_task, texts), expected, atol=1e-6)  # Embedder
    engine = AsyncEmbedder(emb)
    try:
        result, prepared = asyncio.run(engine.perform(toy_task, texts))  # AsyncEmbedder
    finally:
        engine.close()
    np.testing.assert_allclose(result, expected, atol=1e-6)
    assert prepared.tokens == emb.count_tokens(texts)
    metrics = Metrics()
    registry = load_models([tiny_artifact], ["m"], RuntimeOptions(device="cpu"), metrics)
    with TestClient(create_app(registry, ServerOptions(), metrics)) as client:  # vLLM's /pooling
        answer = client.post("/pooling", json={"input": texts, "task": toy_task})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose([d["data"] for d in answer.json()["data"]], expected, atol=1e-6)
        wrong = client.post("/pooling", json={"input": texts, "task": "toy_meen"})
        assert wrong.status_code == 400 and "toy_mean" in wrong.json()["error"]["message"]


def test_the_new_task_runs_in_toolkit_embed_too(toy_task, tiny_artifact, tmp_path):
    """``toolkit embed``'s engine picks any text task with a row per input from the table (BulkOptions.task)."""
    import pyarrow.parquet as pq

    from toolkit.bulk import BulkOptions, embed_files

    texts = ["alpha beta", "gamma delta epsilon", "zeta"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    summary = embed_files(tiny_artifact, tmp_path / "in.txt", tmp_path / "out", BulkOptions(task=toy_task))
    assert summary.rows == 3
    table = pq.read_table(tmp_path / "out")
    emb = Embedder(tiny_artifact, device="cpu")
    expected = (emb.embed(texts) + emb.embed(texts, normalize=False)) / 2
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), expected, atol=1e-6)
    with pytest.raises(Exception, match="--task 'toy_meen' is not one of: embed, token_embed, embed_sparse, classify"):
        embed_files(tiny_artifact, tmp_path / "in.txt", tmp_path / "out2", BulkOptions(task="toy_meen"))
    # a row past the model's maximum is refused alone (found row by row only then), the others still written
    (tmp_path / "long.txt").write_text("\n".join([texts[0], "word " * 500, texts[2]]) + "\n")
    summary = embed_files(tiny_artifact, tmp_path / "long.txt", tmp_path / "out3",
                          BulkOptions(task=toy_task, on_error="skip"))
    assert (summary.rows, summary.skipped) == (2, 1)
    got = np.array(pq.read_table(tmp_path / "out3").column("embedding").to_pylist())
    np.testing.assert_allclose(got, expected[[0, 2]], atol=1e-6)


class _ToyRef:
    """An input of a toy modality, declared as the server's ImageRef declares images."""

    modality = "toy"

    def __init__(self, value: float) -> None:
        self.value = value

    def __len__(self) -> int:  # the positions it counts, for batching budgets and usage
        return 1


class _ToyEncoder:
    """A toy modality's encoder: its 'graph' answers a constant row per input."""

    modality = "toy"
    accepts = staticmethod(lambda item: isinstance(item, _ToyRef))

    def __init__(self, emb, path) -> None:
        self.dims = emb.dimensions

    def run(self, items, outputs, adapter=None):
        return [np.stack([np.full(self.dims, item.value, dtype=np.float32) for item in items])]


def _prepare_toy(emb, items, *, dimensions=None, normalize=None):
    from toolkit.runtime.tasks import Prepared, Run

    return Prepared([Run(list(items), "toy_output", "toy")], lambda rows: np.stack(rows[0]), tokens=len(items))


def test_a_new_modality_is_one_encoder_and_one_task(monkeypatch, tiny_artifact):
    """A modality this code base has never seen: its encoder and its embedding task, registered in one place,
    run through both engines' mixed lists and the server's content router, which refuses it where absent."""
    from toolkit.runtime import encoders, tasks
    from toolkit.server.content import admit_content
    from toolkit.settings import ServerOptions

    monkeypatch.setitem(encoders.ENCODERS, "toy", _ToyEncoder)
    monkeypatch.setitem(tasks.TASKS, "embed_toy", tasks.Task("embed_toy", _prepare_toy, base="embed", modality="toy"))
    plain = Embedder(tiny_artifact, device="cpu")
    emb = Embedder(tiny_artifact, device="cpu")
    emb.encoders["toy"] = _ToyEncoder(emb, emb.path)  # as open_encoders does for a manifest listing "toy"
    items = ["alpha beta", _ToyRef(0.25), "gamma"]
    expected = np.stack([plain.embed("alpha beta")[0], np.full(emb.dimensions, 0.25), plain.embed("gamma")[0]])
    np.testing.assert_allclose(emb.perform("embed_mixed", items), expected, atol=1e-6)
    engine = AsyncEmbedder(emb)
    try:
        vectors, tokens, _ = asyncio.run(engine.embed_mixed(items))
    finally:
        engine.close()
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert tokens == plain.count_tokens(["alpha beta", "gamma"]) + 1
    assert emb.modalities == ("text", "toy")
    assert asyncio.run(admit_content(items, emb, ServerOptions())) == items
    with pytest.raises(RequestError, match=r"input\[1\] is toy content: this dense embedding artifact reads text only"):
        asyncio.run(admit_content(items, plain, ServerOptions()))
