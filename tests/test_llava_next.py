"""LLaVA-NeXT embedders (e5-v): the any-resolution image processor reproduced without torch against transformers'
own (pixels and the feature layout against the model's own packing), and the export's two graphs against
transformers on text-only and image-only items, batched and alone, through the Python API and the HTTP dialects."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from conftest import async_app_client
from PIL import Image
from tiny_models import build_tiny_llava_next

from toolkit.errors import RequestError
from toolkit.export.towers import probe_images
from toolkit.runtime import Embedder
from toolkit.runtime.llava_next import (
    LlavaNextImageSpec,
    best_resolution,
    feature_layout,
    preprocess_llava_next,
)
from toolkit.runtime.pooling import cosines
from toolkit.runtime.vision_language import Multimodal

IMAGES = probe_images()
PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))
SPEC = LlavaNextImageSpec(28, 14, PINPOINTS, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA-NeXT in a folder named as e5-v's checkpoint, so the bundled card (its prompts) applies."""
    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next") / "e5-v")


@pytest.fixture(scope="module")
def e5v(llava_dir):
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    return export_model(str(llava_dir), ExportOptions(output=llava_dir.parent / "e5v.onnx"))


def _awkward() -> dict[str, bytes]:
    """The export's probe images and more: huge, a sliver (extreme aspect ratios both ways), a square."""
    rng = np.random.default_rng(0)
    extra = {"huge.png": rng.integers(0, 255, (900, 1300, 3), dtype=np.uint8),
             "sliver.png": rng.integers(0, 255, (7, 400, 3), dtype=np.uint8),
             "pole.png": rng.integers(0, 255, (500, 11, 3), dtype=np.uint8),
             "square.png": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)}
    return {**IMAGES, **{name: _png(Image.fromarray(a)) for name, a in extra.items()}}


def test_preprocessing_and_layout_match_transformers(llava_dir):
    """Every view pixel for pixel against transformers' LlavaNextImageProcessorPil (within 1e-4; measured 0), and
    the layout's rows against transformers' own get_image_features + pack_image_features on the same views."""
    import torch
    from transformers import AutoImageProcessor, LlavaNextForConditionalGeneration

    processor = AutoImageProcessor.from_pretrained(llava_dir, backend="pil")
    model = LlavaNextForConditionalGeneration.from_pretrained(llava_dir).model.eval()
    for name, data in _awkward().items():
        image = Image.open(io.BytesIO(data))
        expected = processor(images=[image], return_tensors="np")
        views, layout = preprocess_llava_next(Image.open(io.BytesIO(data)), SPEC)
        assert views.shape == expected["pixel_values"][0].shape, name
        assert np.abs(views - expected["pixel_values"][0]).max() <= 1e-4, name
        with torch.no_grad():
            packed = model.get_image_features(torch.from_numpy(views)[None], torch.from_numpy(expected["image_sizes"]),
                                              vision_feature_layer=-2, vision_feature_select_strategy="default")
            states = model.vision_tower(torch.from_numpy(views), output_hidden_states=True).hidden_states[-2][:, 1:]
            rows = torch.cat([model.multi_modal_projector(states).flatten(0, 1), model.image_newline[None]])
        (reference,) = packed.pooler_output
        assert len(layout) == reference.shape[0], name
        torch.testing.assert_close(rows[torch.from_numpy(layout)], reference, rtol=0, atol=1e-6)


def test_best_resolution_prefers_the_most_kept_then_the_least_wasted():
    assert best_resolution(40, 96, PINPOINTS) == (28, 84)  # wide: three tiles across keep the most
    assert best_resolution(60, 60, PINPOINTS) == (56, 56)
    assert best_resolution(9, 13, PINPOINTS) == (28, 56)  # all keep everything: the least waste, the first listed
    assert len(feature_layout(60, 60, SPEC)) == 4 + 4 * 4 + 4  # the base view's 4 rows, a 4 x 4 map, 4 newlines


def test_the_export_matches_transformers_on_texts_and_images(e5v):
    manifest = e5v.manifest
    spec = manifest.vision_language
    assert (spec.family, spec.crop_size, spec.image_token, sorted(spec.templates)) == \
        ("llava_next", 28, "<image>", ["image", "text"])
    assert manifest.card.name == "e5-v" and manifest.max_seq_len == 4096
    assert e5v.path.with_name("e5v.image.onnx").is_file()
    parity = manifest.parity
    assert parity.passed and parity.min_cosine["sentence_embedding"] >= 0.99999
    # every probe image alone and together, texts with and without an instruction; no text + image item (e5-v has
    # no prompt for one)
    labels = {case.output for case in parity.cases}
    assert {f"sentence_embedding (image:{n})" for n in IMAGES} <= labels and "sentence_embedding (text)" in labels
    assert not any("text+image" in label for label in labels)


def test_prompts_batches_and_refusals(e5v):
    emb = Embedder(e5v.path, device="cpu")
    encoder = emb.encoder("multimodal")
    text = encoder.build(Multimodal("a cat"), "", 0, 10**6)
    prompt = emb.tokenizer.decode(text.ids, skip_special_tokens=False)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na cat\nSummary above "
                             "sentence in one word: <|eot_id|>")
    image = encoder.build(Multimodal(images=[IMAGES["wide.png"]]), "", 0, 10**6)
    spec = emb.manifest.vision_language
    assert image.ids.count(spec.image_token_id) == len(feature_layout(40, 96, SPEC)) and image.images[0].width == 96
    items = ["a cat", IMAGES["wide.png"], IMAGES["photo.jpg"], "a much longer sentence about a dog in the park"]
    together = emb.embed(items)
    alone = np.concatenate([emb.embed([item]) for item in items])
    assert cosines(together, alone).min() >= 0.99999  # left padding, positions counted per item
    with pytest.raises(RequestError, match="text \\+ image item; this model embeds text-only and image-only items"):
        emb.embed([Multimodal("a cat", [IMAGES["wide.png"]])])


@pytest.mark.anyio
async def test_http_dialects(e5v):
    emb = Embedder(e5v.path, device="cpu")
    expected = emb.embed(["a red square", IMAGES["photo.jpg"]])
    uri = "data:image/jpeg;base64," + base64.b64encode(IMAGES["photo.jpg"]).decode()
    async with async_app_client(e5v.path, names=("e5-v",)) as client:
        r = await client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}]}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array([r.json()["data"][0]["embedding"]]), expected[1:], atol=1e-5)
        r = await client.post("/v2/embed", json={"texts": ["a red square"], "input_type": "search_query",
                                                 "embedding_types": ["float"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]["float"]), expected[:1], atol=1e-5)
        r = await client.post("/v1/embeddings", json={"input": [{"text": "a red square", "image": uri}]})
        assert r.status_code == 400 and "text-only and image-only items" in r.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200
