"""Artifacts by URI (``toolkit.server.remote_artifacts``): copied once per node into the cache through pyarrow's
filesystems (``file://`` here: the same code path as ``s3://``), checked before they open."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from toolkit.errors import ConfigError
from toolkit.runtime import Embedder
from toolkit.server.remote_artifacts import local_path, localize


def test_a_uri_is_copied_once_checked_and_opens(tiny_artifact, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    shared = tmp_path / "bucket" / "models"
    shared.mkdir(parents=True)
    for f in tiny_artifact.parent.glob(tiny_artifact.stem + ".*"):
        shutil.copy(f, shared / f.name)
    (shared / "other.onnx").write_bytes(b"not part of it")
    uri = (shared / "tiny.onnx").as_uri()
    local = localize(uri)
    assert local.parent.parent == tmp_path / "cache" / "remote" and local.name == "tiny.onnx"
    assert sorted(p.name for p in local.parent.iterdir()) == sorted(p.name for p in shared.glob("tiny.*"))
    np.testing.assert_allclose(Embedder(local).embed(["hello"]), tiny.embed(["hello"]), atol=1e-7)
    stamp = local.stat().st_mtime_ns
    assert localize(uri) == local and local.stat().st_mtime_ns == stamp  # the node has it: nothing copied
    local.write_bytes(local.read_bytes()[:100])  # a truncated copy (a crash before the rename cannot leave one)
    assert localize(uri) == local and local.stat().st_size == (shared / "tiny.onnx").stat().st_size
    assert local_path(str(tiny_artifact)) == tiny_artifact  # a plain path is used where it is


def test_bad_uris_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not an onnx file")
    with pytest.raises(ConfigError, match=r"no such artifact file: .*missing.onnx \(in .*: junk.onnx\)"):
        localize((tmp_path / "missing.onnx").as_uri())
    with pytest.raises(ConfigError, match="does not check out|not an ONNX model"):
        localize((tmp_path / "junk.onnx").as_uri())
    with pytest.raises(ConfigError, match="cannot read nosuchscheme://"):
        localize("nosuchscheme://bucket/model.onnx")
