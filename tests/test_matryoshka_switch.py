"""The serve-time Matryoshka switch (vLLM's ``--hf-overrides '{"is_matryoshka": true}'``): RuntimeOptions'
``matryoshka`` / ``matryoshka_dims`` on Embedder and over the server, and ``toolkit serve --hf-overrides``."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import async_app_client, serve_subprocess

from toolkit.errors import ConfigError, UnsupportedDimensionError
from toolkit.runtime import Embedder
from toolkit.settings import RuntimeOptions, parse_hf_overrides

TEXTS = ["a red fox", "the lazy dog sleeps", "x", "embeddings of several lengths, some longer than others"]


def _cut(full: np.ndarray, dims: int) -> np.ndarray:
    """The full vector cut to ``dims``, then normalized again (vLLM's and sentence-transformers' truncate_dim)."""
    head = full[:, :dims]
    return head / np.linalg.norm(head, axis=1, keepdims=True)


def test_embedder_refuses_a_size_the_card_lacks_until_switched_on(tiny, tiny_artifact):
    """The tiny model's card lists 8 and 16 (of 24): 12 is refused, as vLLM refuses it, unless switched on."""
    full = tiny.embed(TEXTS)
    with pytest.raises(UnsupportedDimensionError, match="dimensions 12 is not supported by this model; allowed: 8, "
                                                         "16, 24"):
        tiny.embed(TEXTS, dimensions=12)

    anyway = Embedder(tiny_artifact, device="cpu", matryoshka=True)  # is_matryoshka: any of 1..24
    assert anyway.card.matryoshka_any and anyway.card.matryoshka_dims == [8, 16]
    for dims in (1, 5, 8, 12, 23):
        got = anyway.embed(TEXTS, dimensions=dims)
        assert got.shape == (len(TEXTS), dims)
        np.testing.assert_allclose(got, _cut(full, dims), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    raw = anyway.embed(TEXTS, normalize=False)
    np.testing.assert_allclose(anyway.embed(TEXTS, dimensions=12, normalize=False), raw[:, :12], atol=1e-5)
    np.testing.assert_array_equal(anyway.embed(TEXTS), full)  # the full size is as before
    with pytest.raises(UnsupportedDimensionError, match="allowed: any of 1..24"):
        anyway.embed(TEXTS, dimensions=25)

    listed = Embedder(tiny_artifact, options=RuntimeOptions(device="cpu", matryoshka_dims=(12, 4)))
    assert listed.card.matryoshka_dims == [4, 12] and not listed.card.matryoshka_any  # the list alone implies on
    np.testing.assert_allclose(listed.embed(TEXTS, dimensions=12), _cut(full, 12), atol=1e-5)
    with pytest.raises(UnsupportedDimensionError, match="allowed: 4, 12, 24"):
        listed.embed(TEXTS, dimensions=8)  # only the listed sizes, the card's own fused ones included

    off = Embedder(tiny_artifact, device="cpu", matryoshka=False)
    with pytest.raises(UnsupportedDimensionError, match="allowed: 24$"):
        off.embed(TEXTS, dimensions=8)
    with pytest.raises(ConfigError, match=r"matryoshka_dims 30 not in 1..24, this model.s dimensions \(--hf-overrides"):
        Embedder(tiny_artifact, device="cpu", matryoshka_dims=(8, 30))
    with pytest.raises(ConfigError, match="not matryoshka=False"):
        Embedder(tiny_artifact, device="cpu", matryoshka=False, matryoshka_dims=(8,))


@pytest.mark.anyio
async def test_server_allows_dimensions_with_the_switch(tiny_artifact, tiny):
    full = tiny.embed(TEXTS)
    body = {"input": TEXTS, "dimensions": 12}
    async with async_app_client(tiny_artifact) as client:
        refused = await client.post("/v1/embeddings", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
        assert "allowed: 8, 16, 24" in refused.json()["error"]["message"]
    async with async_app_client(tiny_artifact, runtime=RuntimeOptions(device="cpu", matryoshka=True)) as client:
        answer = await client.post("/v1/embeddings", json=body)
        assert answer.status_code == 200, answer.text
        got = np.array([row["embedding"] for row in answer.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, _cut(full, 12), atol=1e-5)
        model = (await client.get("/v1/models")).json()["data"][0]
        assert model["matryoshka_any"] is True and model["matryoshka_dimensions"] == [8, 16]
    listed = RuntimeOptions(device="cpu", matryoshka=True, matryoshka_dims=(6, 12))
    async with async_app_client(tiny_artifact, runtime=listed) as client:
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200
        assert (await client.post("/v1/embeddings", json={**body, "dimensions": 8})).status_code == 400
        model = (await client.get("/v1/models")).json()["data"][0]
        assert model["matryoshka_any"] is False and model["matryoshka_dimensions"] == [6, 12]


def test_hf_overrides_accepts_the_two_matryoshka_keys_only():
    assert parse_hf_overrides('{"is_matryoshka": true}') == {"matryoshka": True, "matryoshka_dims": None}
    assert parse_hf_overrides('{"matryoshka_dimensions": [64, 128]}') == {"matryoshka": True,
                                                                          "matryoshka_dims": (64, 128)}
    assert parse_hf_overrides('{"is_matryoshka": false}') == {"matryoshka": False, "matryoshka_dims": None}
    for bad, says in (
        ('{"is_matryoshka": true, "pooling_type": "MEAN"}', "key 'pooling_type' is not accepted; accepted keys: "
                                                            "is_matryoshka, matryoshka_dimensions"),
        ("{is_matryoshka: true}", "is not valid JSON"),
        ('[{"is_matryoshka": true}]', "must be a JSON object"),
        ('{"is_matryoshka": "yes"}', "is_matryoshka must be true or false"),
        ('{"matryoshka_dimensions": [0, 64]}', "a non-empty list of positive integers"),
        ('{"matryoshka_dimensions": 64}', "a non-empty list of positive integers"),
        ('{"is_matryoshka": false, "matryoshka_dimensions": [64]}', "not false"),
    ):
        with pytest.raises(ConfigError, match=says.replace("[", r"\[")):
            parse_hf_overrides(bad)


def test_serve_hf_overrides_flag(tiny_artifact, tiny):
    serve = [sys.executable, "-m", "toolkit.cli", "serve", str(tiny_artifact), "--port", "0", "--hf-overrides"]
    for value, says in (
        ('{"is_matryoshka": true, "max_model_len": 8}', "error: --hf-overrides key 'max_model_len' is not accepted; "
                                                       "accepted keys: is_matryoshka, matryoshka_dimensions"),
        ('{"is_matryoshka": tru}', "error: --hf-overrides is not valid JSON"),
        ('{"matryoshka_dimensions": [8, 99]}', "error: matryoshka_dims 99 not in 1..24"),  # checked on the model
    ):
        done = subprocess.run([*serve, value], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (value, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(says), (value, done.stderr)

    url, _, proc = serve_subprocess(tiny_artifact, "--hf-overrides", '{"is_matryoshka": true}')
    try:
        answer = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "dimensions": 12}, timeout=30)
        assert answer.status_code == 200, answer.text
        got = np.array([row["embedding"] for row in answer.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, _cut(tiny.embed(TEXTS), 12), atol=1e-5)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["matryoshka_any"] is True
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
