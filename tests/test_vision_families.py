"""The vision-language family registry (``toolkit.vision_families``): one entry per family, found by both engines.

A toy family added with ONE registry line and one module per side (inserted in ``sys.modules``) is what the
export's generic steps (the spec, the vision graph, the language graph's position axes, the parity reference and
its processor) and the runtime encoder's family lookup reach; nothing else names it. No model is exported.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from toolkit.errors import ConfigError
from toolkit.export.architectures import ARCHITECTURES
from toolkit.vision_families import FAMILIES, Family, load_half

EXPORT_PROTOCOL = ("build_spec", "export_vision", "POSITION_AXES", "load_processor", "run_reference")
RUNTIME_PROTOCOL = ("prepare", "positions")  # and ``outputs``, which Qwen sets per spec


def test_registry_matches_the_architectures_marked_vision_language():
    """Every family is an architecture marked vision-language, or the model inside a ColVision checkpoint that only
    that checkpoint exports (PaliGemma: ColPali)."""
    from toolkit.export.colvision import COLVISION_TYPES

    marked = {model_type for model_type, spec in ARCHITECTURES.items() if spec.vision_language}
    colvision = {t for allowed, _, _ in COLVISION_TYPES.values() for t in allowed}
    assert marked | colvision == set(FAMILIES), ((marked | colvision) ^ set(FAMILIES))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_both_halves_with_the_protocol(family):
    export, runtime = load_half(family, "export"), load_half(family, "runtime")
    assert [name for name in EXPORT_PROTOCOL if not hasattr(export, name)] == []
    assert export.POSITION_AXES in (1, 3)
    assert [name for name in RUNTIME_PROTOCOL if not hasattr(runtime.Images, name)] == []


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(ConfigError, match="vision-language family 'qwen9_vl' is not one of: qwen2_vl, qwen2_5_vl, "
                                          r"qwen3_vl, llava_next, paligemma \(an artifact from a newer toolkit\?\)"):
        load_half("qwen9_vl", "runtime")


class _ToyImages:
    outputs = ("image_embeds",)

    def __init__(self, spec) -> None:
        self.spec = spec

    def prepare(self, image, index: int):
        return {"pixel_values": np.zeros((1, 3), np.float32)}, 1, None

    @staticmethod
    def positions(is_image, grids) -> np.ndarray:
        return np.arange(len(is_image), dtype=np.int64)[None]


@pytest.fixture
def toy(monkeypatch):
    """The family ``toy_vl``: one registry line and a module per side; ``calls`` records what the export half
    was asked."""
    import torch

    calls: dict[str, tuple] = {}
    export = types.ModuleType("toy_vl_export")
    export.POSITION_AXES = 2

    def build_spec(resolved, cfg, tokenizer, token, token_id, resample):
        calls["build_spec"] = (cfg, token, token_id, resample)
        return "toy spec"

    def export_vision(model, resolved, spec, *, opset, path):
        calls["export_vision"] = (opset, path.name)

    def load_processor(resolved, spec, tokenizer):
        calls["load_processor"] = (spec.family,)
        return "toy processor"

    def run_reference(model, spec, tokenizer, processor, item):
        calls["run_reference"] = (processor, item["text"])
        return torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])  # (1, seq, hidden): the last row is pooled

    export.build_spec, export.export_vision = build_spec, export_vision
    export.load_processor, export.run_reference = load_processor, run_reference
    runtime = types.ModuleType("toy_vl_runtime")
    runtime.Images = _ToyImages
    monkeypatch.setitem(sys.modules, "toy_vl_export", export)
    monkeypatch.setitem(sys.modules, "toy_vl_runtime", runtime)
    monkeypatch.setitem(FAMILIES, "toy_vl", Family(export="toy_vl_export", runtime="toy_vl_runtime"))
    return calls


def _resolved(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    return SimpleNamespace(model_dir=tmp_path, config={"image_token_id": 5}, arch=SimpleNamespace(
        model_type="toy_vl", inputs=("input_ids", "attention_mask", "position_ids", "image_embeds")),
        head=SimpleNamespace(outputs=lambda card: ["sentence_embedding"]), card=None)


def test_the_export_reaches_a_new_family_through_the_registry(toy, tmp_path, monkeypatch):
    import torch

    from toolkit.export.vision_language import export_vision_language_graphs, vision_language_spec

    resolved = _resolved(tmp_path)
    tokenizer = SimpleNamespace(vocab_size=10, token_strings=lambda ids: ["<toy image>" for _ in ids])
    assert vision_language_spec(resolved, tokenizer) == "toy spec"
    assert toy["build_spec"] == ({"resample": 2}, "<toy image>", 5, "bilinear")  # the shared checks done first

    exported = {}

    def fake_export(graph, inputs, **kwargs):  # the language graph as torch.onnx would see it
        exported["positions"] = inputs[2].shape
        return SimpleNamespace(save=lambda *a, **k: None)

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    spec = SimpleNamespace(family="toy_vl", image_token_id=5, hidden_size=4, deepstack=0)
    model = SimpleNamespace(language_model=SimpleNamespace())
    language, vision = export_vision_language_graphs(model, resolved, spec, opset=18, tmp=tmp_path)
    assert toy["export_vision"] == (18, vision.name)
    assert exported["positions"][0] == 2  # the family's POSITION_AXES


def test_the_parity_reference_asks_the_family(toy, tmp_path):
    from toolkit.export.vision_language_parity import _processor, _reference

    spec = SimpleNamespace(family="toy_vl")
    processor = _processor(_resolved(tmp_path), spec, None)
    assert processor == "toy processor" and toy["load_processor"] == ("toy_vl",)
    vector = _reference(None, None, spec, None, processor, {"text": "hi"})
    assert toy["run_reference"] == ("toy processor", "hi")
    np.testing.assert_allclose(vector, [0.6, 0.8])


def test_the_runtime_encoder_finds_a_new_family_through_the_registry(toy, tmp_path):
    from toolkit.runtime.vision_language import FAMILIES as RUNTIME_FAMILIES
    from toolkit.runtime.vision_language import VisionLanguageEncoder

    assert "toy_vl" in RUNTIME_FAMILIES and "toy_vl" in list(RUNTIME_FAMILIES)
    assert RUNTIME_FAMILIES["toy_vl"] is _ToyImages

    def ctx(family: str):
        spec = SimpleNamespace(family=family, templates={})
        return SimpleNamespace(manifest=SimpleNamespace(vision_language=spec, chat_template="{{ messages }}"))

    with pytest.raises(ConfigError, match="its vision graph toy.image.onnx is not beside it"):  # past the family
        VisionLanguageEncoder(ctx("toy_vl"), tmp_path / "toy.onnx")
    with pytest.raises(ConfigError, match="vision-language family 'qwen9_vl' is not one of: qwen2_vl, .*toy_vl"):
        VisionLanguageEncoder(ctx("qwen9_vl"), tmp_path / "toy.onnx")
