"""CLIP and SigLIP: both towers exported and checked, images decoded safely, text and image in one space."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from toolkit.cards import Pooling
from toolkit.errors import ConfigError, RequestError
from toolkit.export.towers import image_tower_path, probe_images
from toolkit.manifest import MANIFEST_KEY, decode_manifest
from toolkit.runtime import Embedder
from toolkit.runtime.images import MAX_PIXELS, load_pixels
from toolkit.runtime.pooling import cosines

IMAGES = probe_images()


def _uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fixture", ["clip_artifact", "siglip_artifact"])
def test_both_towers_meet_parity(fixture, request):
    path = request.getfixturevalue(fixture)
    manifest = Embedder(path, device="cpu").manifest
    assert manifest.parity.passed and manifest.parity.min_cosine["sentence_embedding"] >= 0.99999
    assert any(c.output == "sentence_embedding (get_text_features)" for c in manifest.parity.cases)
    image = manifest.image
    assert image.parity.passed and image.parity.min_cosine["image_embedding"] >= 0.9999
    assert image.parity.max_abs_diff["pixel_values"] <= 1e-4  # our Pillow + numpy pixels = transformers' processor's
    probed = {c.output for c in image.parity.cases}
    assert {f"image_embedding ({name})" for name in IMAGES} <= probed  # every awkward kind, one at a time too
    assert image_tower_path(path).is_file()


def test_manifest_carries_the_preprocessing_and_text_facts(clip_artifact, siglip_artifact):
    clip = Embedder(clip_artifact, device="cpu").manifest
    assert clip.card.pooling == Pooling.EOS and not clip.card.pad_to_max_length and clip.max_seq_len == 77
    spec = clip.image.preprocess
    assert (spec.resize, spec.size, spec.resample, spec.center_crop) == ("shortest_edge", [32], "bicubic", [32, 32])
    assert spec.mean[0] == pytest.approx(0.48145466) and spec.exif_transpose and spec.convert_rgb
    siglip = Embedder(siglip_artifact, device="cpu").manifest
    assert siglip.card.pooling == Pooling.LAST_TOKEN and siglip.card.pad_to_max_length and siglip.max_seq_len == 64
    assert siglip.inputs == ["input_ids"]  # read without an attention mask, as its processor feeds it
    spec = siglip.image.preprocess
    assert (spec.resize, spec.size, spec.resample, spec.center_crop) == ("fixed", [32, 32], "bilinear", None)


def test_each_file_runs_in_plain_onnxruntime(clip_artifact):
    """Each tower is self-contained: its manifest, tokenizer and card inside; plain onnxruntime runs it."""
    emb = Embedder(clip_artifact, device="cpu")
    image_file = image_tower_path(clip_artifact)
    session = ort.InferenceSession(str(image_file), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    tower = decode_manifest(meta[MANIFEST_KEY])
    assert tower.tower == "image" and tower.image.preprocess == emb.manifest.image.preprocess
    assert "toolkit.tokenizer" in meta
    pixels = load_pixels(IMAGES["photo.jpg"], 0, tower.image.preprocess).pixels[None]
    (vector,) = session.run(["image_embedding"], {"pixel_values": pixels})
    np.testing.assert_allclose(vector[0], emb.embed_images(IMAGES["photo.jpg"])[0], atol=1e-6)
    text = ort.InferenceSession(str(clip_artifact), providers=["CPUExecutionProvider"])
    ids = np.array([emb.tokenize("a photo of a cat")], dtype=np.int64)
    (vector,) = text.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(vector[0], emb.embed("a photo of a cat")[0], atol=1e-6)


def test_clip_uses_the_real_clip_vocabulary(clip_artifact):
    emb = Embedder(clip_artifact, device="cpu")
    assert emb.tokenizer.vocab_size == 49408
    assert emb.tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-base-patch32's ids


def test_siglip_text_is_padded_to_its_trained_length(siglip_artifact):
    """SigLIP pools the last position: padded to 64 (what the runtime does) and unpadded give other vectors."""
    emb = Embedder(siglip_artifact, device="cpu")
    (item,) = emb.tokenize_inputs(["a photo of a cat"])
    session = ort.InferenceSession(str(siglip_artifact), providers=["CPUExecutionProvider"])
    (unpadded,) = session.run(["sentence_embedding"], {"input_ids": np.array([item.ids], dtype=np.int64)})
    padded = emb.embed("a photo of a cat")[0]
    assert float(unpadded[0] @ padded) < 0.9999
    ids = item.ids + [emb.manifest.pad_token_id] * (64 - len(item.ids))
    (by_hand,) = session.run(["sentence_embedding"], {"input_ids": np.array([ids], dtype=np.int64)})
    np.testing.assert_allclose(by_hand[0], padded, atol=1e-6)


def test_every_input_form_gives_the_same_vector(clip_artifact, tmp_path):
    emb = Embedder(clip_artifact, device="cpu")
    data = IMAGES["wide.png"]
    path = tmp_path / "wide.png"
    path.write_bytes(data)
    forms = [data, path, str(path), _uri(data), Image.open(io.BytesIO(data))]
    vectors = emb.embed_images(forms)
    assert vectors.shape == (5, emb.dimensions) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 5, axis=0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    raw = emb.embed_images(data, normalize=False)
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3  # the projection's own output, not normalized


def test_batched_equals_one_at_a_time_across_batches(clip_artifact):
    emb = Embedder(clip_artifact, device="cpu", max_batch_size=3)  # 7 images: batches of 3, 3, 1, decoded ahead
    images = list(IMAGES.values())
    together = emb.embed_images(images)
    alone = np.concatenate([emb.embed_images(image) for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_score_takes_images_on_either_side(clip_artifact):
    emb = Embedder(clip_artifact, device="cpu")
    images = [IMAGES["wide.png"], IMAGES["tall.png"]]
    captions = ["a photo of a cat", "a diagram"]
    text, image = emb.embed(captions), emb.embed_images(images)
    np.testing.assert_allclose(emb.score(captions[0], images), image @ text[0], atol=1e-5)
    np.testing.assert_allclose(emb.score(images[0], captions), text @ image[0], atol=1e-5)
    np.testing.assert_allclose(emb.score(images, captions), (image * text).sum(1), atol=1e-5)


def test_exif_orientation_is_applied_as_transformers_load_image_does(clip_artifact, tmp_path):
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    emb = Embedder(clip_artifact, device="cpu")
    upright = Image.open(io.BytesIO(IMAGES["photo.jpg"])).convert("RGB")  # 120 x 80
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes, with orientation 6 (rotate 270)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    tagged = buffer.getvalue()
    path = tmp_path / "tagged.jpg"
    path.write_bytes(tagged)
    processor = AutoImageProcessor.from_pretrained(clip_artifact.parent / "model", backend="pil")
    reference = processor(images=[load_image(str(path))], return_tensors="np")["pixel_values"][0]
    ours = load_pixels(tagged, 0, emb.manifest.image.preprocess).pixels
    assert np.abs(ours - reference).max() <= 1e-4
    assert load_image(str(path)).size == (120, 80)  # transformers turned it upright too
    untransposed = emb.embed_images(stored)  # a PIL image given as is: no EXIF on it, nothing to apply
    assert float(emb.embed_images(tagged)[0] @ untransposed[0]) < 0.99999


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 megapixels in a few kilobytes
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


HOSTILE = {
    "a decompression bomb": (_bomb, "pixels is outside"),
    "a truncated file": (lambda: IMAGES["photo.jpg"][: len(IMAGES["photo.jpg"]) // 2], "cannot be decoded"),
    "bytes that are no image": (lambda: b"%PDF-1.7 not an image at all", "not an image Pillow can identify"),
    "an unsupported format": (lambda: _encoded(Image.new("RGB", (8, 8)), "PPM"), "format PPM is not accepted"),
    "an absurd aspect ratio": (lambda: _encoded(Image.new("RGB", (1, 40_000)), "PNG"), "aspect ratio is too extreme"),
    "a bad data URI": (lambda: "data:image/png;base64,@@@@", "base64 payload is invalid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_images_fail_alone_naming_their_index(case, clip_artifact):
    make, message = HOSTILE[case]
    assert MAX_PIXELS < 100_000_000
    emb = Embedder(clip_artifact, device="cpu")
    with pytest.raises(RequestError, match=f"image 2: .*{message}"):
        emb.embed_images([IMAGES["wide.png"], IMAGES["gray.png"], make(), IMAGES["tall.png"]])
    good = emb.embed_images([IMAGES["wide.png"], IMAGES["tall.png"]])  # the embedder is unharmed
    assert good.shape == (2, emb.dimensions)


def test_text_only_artifacts_and_misplaced_files_say_what_to_do(clip_artifact, tiny_artifact, tmp_path):
    with pytest.raises(RequestError, match="no image tower"):
        Embedder(tiny_artifact, device="cpu").embed_images(IMAGES["wide.png"])
    with pytest.raises(ConfigError, match="is the image tower of clip.onnx: open"):
        Embedder(image_tower_path(clip_artifact), device="cpu")
    alone = tmp_path / "clip.onnx"
    alone.write_bytes(clip_artifact.read_bytes())
    with pytest.raises(ConfigError, match="its image tower clip.image.onnx is not beside it"):
        Embedder(alone, device="cpu")
    with pytest.raises(RequestError, match="dimensions 8 is not supported"):
        Embedder(clip_artifact, device="cpu").embed_images(IMAGES["wide.png"], dimensions=8)


def test_int8_quantizes_the_image_tower_behind_its_gate(clip_artifact, tmp_path):
    """``--precision int8`` on a two-tower model: every weight GEMM of the image tower in int8 (dynamic, per-channel
    weights), held to int8's gate on image embeddings (min cosine 0.99 against transformers' fp32 model on every
    probe image); the text tower stays fp32 and keeps fp32's gate; the manifest says so."""

    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    result = export_model(str(clip_artifact.parent / "model"), ExportOptions(output=tmp_path / "c8.onnx", precision="int8"))
    manifest = result.manifest
    assert manifest.precision == "int8" and manifest.optimization["text_tower"] == "fp32"
    quantized, total = manifest.optimization["image_int8_matmuls"].split("/")
    assert quantized == total and int(total) >= 8 and "int8_gated_on" in manifest.optimization
    assert manifest.image.parity.passed and manifest.image.parity.threshold == 0.99
    assert manifest.image.parity.min_cosine["image_embedding"] >= 0.99 and manifest.parity.threshold == 0.99999
    from toolkit.export.int8_weights import weight_gemms

    ops = [n.op_type for n in onnx.load(str(image_tower_path(result.path)), load_external_data=False).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == int(total)  # the projection's Gemm too
    assert weight_gemms(image_tower_path(result.path)) == []  # left in fp32: attention's, weightless
    fp32, int8 = Embedder(clip_artifact, device="cpu"), Embedder(result.path, device="cpu")
    images = list(IMAGES.values())
    assert cosines(int8.embed_images(images), fp32.embed_images(images)).min() >= 0.99
    np.testing.assert_allclose(int8.embed(["a photo of a cat"]), fp32.embed(["a photo of a cat"]), atol=1e-6)


def test_serving_install_decodes_images_without_torch(clip_artifact):
    """The runtime path (decode, preprocess, both towers) imports neither torch nor transformers."""
    code = (
        "import sys, base64\n"
        "from toolkit.runtime import Embedder\n"
        f"e = Embedder({str(clip_artifact)!r}, device='cpu')\n"
        f"v = e.embed_images([base64.b64decode({base64.b64encode(IMAGES['rgba.png']).decode()!r})])\n"
        "t = e.embed(['a cat'])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,\n"
        "                  'shape': list(v.shape)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"torch": False, "transformers": False, "shape": [1, 24]}


def test_image_tower_graph_takes_fixed_pixels_with_a_dynamic_batch(clip_artifact):
    graph = onnx.load(str(image_tower_path(clip_artifact)), load_external_data=False)
    (pixels,) = graph.graph.input
    dims = [d.dim_value or d.dim_param for d in pixels.type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)


def test_readme_plain_onnxruntime_snippet_matches_the_embedder(clip_artifact, tmp_path):
    """The docs' Pillow + numpy snippet (docs/images.md), run as written (file names swapped), gives the Embedder's vector."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "images.md").read_text()
    section = readme.split("The image tower in plain onnxruntime", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(IMAGES["photo.jpg"])
    code = code.replace('"clip.image.onnx"', repr(str(image_tower_path(clip_artifact)))).replace('"cat.jpg"', repr(str(photo)))
    scope: dict = {}
    exec(compile(code, "docs/images.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    expected = Embedder(clip_artifact, device="cpu").embed_images(photo)
    np.testing.assert_allclose(scope["vector"], expected, atol=1e-5)
