"""Batch workers: several batches of one take (or of one Embedder.run call) at once, each on its share of the
onnxruntime threads; the server's default for the device."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from toolkit.errors import BackendError, ConfigError
from toolkit.runtime import AsyncEmbedder, Embedder
from toolkit.runtime.session import default_batch_workers
from toolkit.settings import Device, RuntimeOptions

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(24)]


class Overlap:
    """Wraps ``run_batch``: each call holds 30 ms; records the most calls running at once and their threads;
    fails a batch holding an input of ``fail_on`` tokens."""

    def __init__(self, embedder: Embedder, fail_on: int | None = None) -> None:
        self.real = embedder.run_batch
        self.lock = threading.Lock()
        self.active = self.most = 0
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, items, outputs, modality="text", adapter=None):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.03)
            if any(len(t) == self.fail_on for t in items):
                raise BackendError("boom")
            return self.real(items, outputs, modality, adapter)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def two_workers(tiny_artifact):
    # batches of at most 2 inputs: a take of 24 texts is 12 batches
    return Embedder(tiny_artifact, device="cpu", intra_op_threads=2, batch_workers=2, max_batch_size=2)


def test_each_worker_runs_on_its_share_of_the_threads(tiny_artifact, two_workers):
    assert two_workers.session.threads == 1
    assert two_workers.session._session.get_session_options().intra_op_num_threads == 1
    assert Embedder(tiny_artifact, device="cpu", intra_op_threads=2).session.threads == 2
    assert Embedder(tiny_artifact, device="cpu", intra_op_threads=1, batch_workers=2).session.threads == 1


def test_two_workers_run_a_takes_batches_at_once_and_match_solo(tiny, two_workers, monkeypatch):
    overlap = Overlap(two_workers)
    monkeypatch.setattr(two_workers, "run_batch", overlap)
    engine = AsyncEmbedder(two_workers)
    try:
        async def scenario():
            return await asyncio.gather(*(engine.embed(t) for t in TEXTS))

        results = asyncio.run(scenario())
        for text, (vector, _) in zip(TEXTS, results):
            np.testing.assert_allclose(vector[0], tiny.embed(text)[0], atol=1e-5)
        assert overlap.most == 2, f"at most {overlap.most} batches ran at once"
        assert overlap.threads == {"toolkit-batcher-0", "toolkit-batcher-1"}
        assert engine.alive
    finally:
        engine.close()
    assert not engine.alive


def test_a_failing_batch_fails_only_its_callers_with_two_workers(two_workers, monkeypatch):
    overlap = Overlap(two_workers, fail_on=3)  # "x" is [CLS] x [SEP]; every other text is longer
    monkeypatch.setattr(two_workers, "run_batch", overlap)
    engine = AsyncEmbedder(two_workers)
    try:
        async def scenario():
            return await asyncio.gather(*(engine.embed(t) for t in [*TEXTS[:8], "x", *TEXTS[8:16]]),
                                        return_exceptions=True)

        results = asyncio.run(scenario())
        failed = [r for r in results if isinstance(r, Exception)]
        # the one-word input's batch fails: it and its batch partner (batches of 2), no one else
        assert 1 <= len(failed) <= 2 and all(isinstance(e, BackendError) for e in failed)
        assert isinstance(results[8], BackendError)
        assert sum(not isinstance(r, Exception) for r in results) >= len(results) - 2
        assert engine.alive
        vector, _ = asyncio.run(engine.embed(TEXTS[0]))
        assert vector.shape == (1, 24)
    finally:
        engine.close()


def test_embedder_run_with_two_workers_keeps_order_and_values(tiny, two_workers, monkeypatch):
    overlap = Overlap(two_workers)
    monkeypatch.setattr(two_workers, "run_batch", overlap)
    done = []
    vectors = two_workers.embed(TEXTS)
    np.testing.assert_allclose(vectors, tiny.embed(TEXTS), atol=1e-5)
    assert overlap.most == 2
    items = two_workers.tokenize_inputs(TEXTS)
    rows = two_workers.run(items, "sentence_embedding", on_batch=done.append)
    assert sum(done) == len(TEXTS) and len(done) == 12
    np.testing.assert_allclose(np.stack(rows), Embedder(two_workers.path, device="cpu", max_batch_size=2)
                               .run(items, "sentence_embedding"), atol=1e-6)


def test_the_servers_default_is_two_workers_on_a_cpu_with_two_threads(monkeypatch):
    assert default_batch_workers(Device.CPU, 2) == 2
    assert default_batch_workers(Device.CPU, 8) == 2
    assert default_batch_workers(Device.CPU, 1) == 1
    assert default_batch_workers(Device.CUDA, 8) == 1
    monkeypatch.setattr("toolkit.runtime.session.default_threads", lambda: 1)
    assert default_batch_workers(Device.CPU, None) == 1
    assert RuntimeOptions().batch_workers == 1  # in-process: one batch at a time on every thread


def test_ray_replicas_choose_their_workers_on_their_own_threads():
    pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")
    from toolkit.server.ray import ScaleOptions, parse_args, replica_runtime

    _, _, _, runtime, scale = parse_args({"models": "m.onnx"}, check_files=False)
    assert runtime.batch_workers is None
    assert replica_runtime(runtime, scale).batch_workers == 1  # one CPU a replica: one thread
    assert replica_runtime(runtime, ScaleOptions(replica_cpus=4)).batch_workers == 2
    assert replica_runtime(runtime, ScaleOptions(replica_cpus=4, replica_gpus=1)).batch_workers == 1
    _, _, _, given, _ = parse_args({"models": "m.onnx", "batch_workers": "3"}, check_files=False)
    assert replica_runtime(given, ScaleOptions(replica_cpus=4)).batch_workers == 3
    with pytest.raises(ConfigError, match="batch_workers=0 is not 1 or more"):
        parse_args({"models": "m.onnx", "batch_workers": "0"}, check_files=False)
