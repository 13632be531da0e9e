"""Vision-language embedders (Qwen2-VL, as GME and DSE are): the export's two graphs against transformers (its model,
its image processor, its chat template) on text-only, image-only and text + image items, batched with mixed image
sizes and alone; the Python API's input forms; the serving process without torch; every HTTP dialect's way of
sending an item with text and images, through the real openai and cohere clients."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import async_app_client, serve_subprocess
from tiny_models import build_tiny_qwen2_vl

from toolkit.errors import RequestError
from toolkit.export.towers import probe_images
from toolkit.runtime import Embedder
from toolkit.runtime.pooling import cosines
from toolkit.runtime.video import Video
from toolkit.runtime.vision_language import Multimodal

IMAGES = probe_images()


def _uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(IMAGES[name]).decode()


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """A tiny Qwen2-VL in a folder named as GME's checkpoint, so the bundled card (its prompts, suffix, pixel
    bounds and length) applies as it does to the real one."""
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl") / "gme-Qwen2-VL-2B-Instruct")


@pytest.fixture(scope="module")
def vl_export(vl_dir):
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    return export_model(str(vl_dir), ExportOptions(output=vl_dir.parent / "vl.onnx"))


@pytest.fixture(scope="module")
def vl(vl_export):
    return Embedder(vl_export.path, device="cpu")


@pytest.fixture(scope="module")
def reference(vl_dir, vl_export):
    """The model's own embedding of one item (``export.vision_language``'s transformers reference)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.export.resolve import resolve_model
    from toolkit.export.vision_language import load_vision_language
    from toolkit.export.vision_language_parity import _reference
    from toolkit.settings import ExportOptions

    resolved = resolve_model(str(vl_dir), ExportOptions())
    model = load_vision_language(resolved)
    tokenizer = AutoTokenizer.from_pretrained(vl_dir)
    spec = vl_export.manifest.vision_language
    processor = Qwen2VLImageProcessorPil.from_pretrained(vl_dir, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)

    def embed(text=None, images=(), instruction=None):
        item = {"text": text, "images": list(images), "instruction": instruction}
        return _reference(model, resolved, spec, tokenizer, processor, item)

    return embed


def test_the_export_is_two_graphs_verified_on_every_kind_of_item(vl_export):
    manifest = vl_export.manifest
    assert manifest.head.name == "vision_language" and manifest.head.modalities == ["text", "image", "multimodal"]
    assert vl_export.path.with_name("vl.image.onnx").is_file()
    spec = manifest.vision_language
    assert spec.image_token == "<|image_pad|>" and spec.prompt_suffix == "<|endoftext|>"
    assert manifest.card.name == "gme-Qwen2-VL-2B-Instruct" and manifest.max_seq_len == 1800
    # the card's bounds, not preprocessor_config.json's (56 * 56 .. 28 * 28 * 16): 256 .. 1280 image tokens
    assert (spec.min_pixels, spec.max_pixels, spec.merge_size) == (256 * 28 * 28, 1280 * 28 * 28, 2)
    report = manifest.parity
    assert report.passed and report.min_cosine["sentence_embedding"] >= 0.99999
    labels = {case.output for case in report.cases}
    assert {"sentence_embedding (text+image)", "sentence_embedding (text+2 images)",
            "sentence_embedding (image:palette.png)", "sentence_embedding (batch of all)"} <= labels
    assert all(case.min_cosine >= 0.99999 for case in report.cases)
    assert spec.parity == report


def test_embeddings_match_transformers_alone_and_in_mixed_batches(vl, reference):
    items = [Multimodal("a photo of a cat"), Multimodal(images=[IMAGES["tall.png"]]),
             Multimodal("what does this chart say?", [IMAGES["wide.png"]]),
             Multimodal("two pictures", [IMAGES["small.png"], IMAGES["photo.jpg"]])]
    expected = np.stack([reference("a photo of a cat"), reference(images=[IMAGES["tall.png"]]),
                         reference("what does this chart say?", [IMAGES["wide.png"]]),
                         reference("two pictures", [IMAGES["small.png"], IMAGES["photo.jpg"]])])
    batched = vl.embed(items)  # batch of 4: images of three sizes and none
    assert batched.shape == (4, vl.dimensions)
    assert cosines(batched, expected).min() >= 0.99999
    alone = np.concatenate([vl.embed([item]) for item in items])
    assert cosines(alone, expected).min() >= 0.99999
    # every input form: a string, an image, a Multimodal item, mixed in one list
    mixed = vl.embed(["a photo of a cat", IMAGES["tall.png"], items[2]])
    np.testing.assert_allclose(mixed, batched[:3], atol=1e-5)
    np.testing.assert_allclose(vl.embed_images([IMAGES["tall.png"]]), batched[1:2], atol=1e-5)
    instructed = vl.embed("where do cats sleep?", prompt="Find an image that matches the text.")
    assert cosines(instructed, reference("where do cats sleep?", instruction="Find an image that matches the text."))[0] >= 0.99999
    scores = vl.score("a photo of a cat", [IMAGES["tall.png"], items[2]])
    np.testing.assert_allclose(scores, batched[[1, 2]] @ batched[0], atol=1e-5)


def test_bad_items_are_refused_alone(vl):
    with pytest.raises(RequestError, match="at most 8 per item"):
        vl.embed(Multimodal("x", [IMAGES["tiny.png"] if "tiny.png" in IMAGES else IMAGES["small.png"]] * 9))
    with pytest.raises(RequestError, match="no content"):
        vl.embed([Multimodal()])
    with pytest.raises(RequestError, match="image placeholders"):
        vl.embed("a text holding <|image_pad|> itself")
    with pytest.raises(RequestError, match="truncate_prompt_tokens is not supported"):
        vl.embed("x", truncate_prompt_tokens=4)
    with pytest.raises(RequestError, match="reads at most 1800"):
        vl.embed(" ".join(["word"] * 4000))
    with pytest.raises(RequestError, match="image 1"):
        vl.embed(["fine", b"not an image"])
    with pytest.raises(RequestError, match="prompt_name 'nope'"):
        vl.embed("x", prompt_name="nope")
    with pytest.raises(RequestError, match="reads texts and images only"):  # videos: Qwen3-VL only
        vl.embed([Video([IMAGES["photo.jpg"]] * 2)])


def test_serving_imports_neither_torch_nor_transformers(vl_export, tmp_path):
    script = (
        "import sys\n"
        "from toolkit.runtime import Embedder\n"
        "from toolkit.runtime.vision_language import Multimodal\n"
        f"emb = Embedder({str(vl_export.path)!r}, device='cpu')\n"
        f"image = open({str(tmp_path / 'wide.png')!r}, 'rb').read()\n"
        "vectors = emb.embed(['a text', image, Multimodal('a caption', [image])])\n"
        "assert vectors.shape[0] == 3\n"
        "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('LOADED', loaded)\n"
    )
    (tmp_path / "wide.png").write_bytes(IMAGES["wide.png"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


def _vectors(body) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


@pytest.mark.anyio
async def test_every_dialect_sends_text_and_images_in_one_item(vl_export, vl):
    expected = vl.embed([Multimodal("what is this?", [IMAGES["wide.png"]]), Multimodal("what is this?"),
                         IMAGES["tall.png"], Multimodal(images=[IMAGES["wide.png"], IMAGES["photo.jpg"]])])
    image = {"type": "image_url", "image_url": {"url": _uri("wide.png")}}
    text = {"type": "text", "text": "what is this?"}
    async with async_app_client(vl_export.path, names=("vl",)) as client:
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["modalities"] == ["text", "image", "multimodal"]
        r = await client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [image, text]}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r.json()), expected[:1], atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] > 20  # the prompt's tokens, the image's placeholders included
        r = await client.post("/v1/embeddings", json={"input": [{"text": "what is this?", "image": _uri("wide.png")},
                                                                {"text": "what is this?"}, {"image": _uri("tall.png")}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r.json()), expected[:3], atol=1e-5)
        two = [image, {"type": "image_url", "image_url": {"url": _uri("photo.jpg")}}]
        r = await client.post("/v2/embed", json={"inputs": [{"content": [image, text]}, {"content": two}],
                                                 "input_type": "search_document", "embedding_types": ["float"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]["float"]), expected[[0, 3]], atol=1e-5)
        billed, encoder = r.json()["meta"]["billed_units"], vl.encoder("multimodal")
        rows = [image.tokens for item in (Multimodal("x", [IMAGES["wide.png"]]),
                                          Multimodal(images=[IMAGES["wide.png"], IMAGES["photo.jpg"]]))
                for image in encoder.build(item, "", 0, 10**6).images]
        assert min(rows) >= 256  # the card's minimum: 256 image tokens of 28 x 28 pixels
        assert billed["images"] == 3 and billed["image_tokens"] == sum(rows) and billed["input_tokens"] > 0
        assert r.json()["images"][0] == {"width": 96, "height": 40, "format": "png", "bit_depth": 8}
        r = await client.post("/v1/embeddings", json={"input": "x", "truncate_prompt_tokens": 3})
        assert r.status_code == 400 and "not supported for vision-language" in r.json()["error"]["message"]
        many = [{"type": "image_url", "image_url": {"url": _uri("small.png")}}] * 9
        r = await client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": many}]})
        assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200


@pytest.mark.anyio
async def test_chat_requests_render_as_they_say_and_tokenize_counts_what_is_embedded(vl_dir, vl_export, vl):
    """A chat request that sets its flags (or brings its own system message) is rendered as it says, as vLLM
    renders chat embeddings: token for token transformers' rendering of those messages (its chat template, its
    image processor's grid for the placeholders), embedded as the model embeds those tokens; /tokenize of the same
    body gives exactly the tokens /v1/embeddings embeds (its usage). A user-only body without flags stays one plain
    item by the card's convention, and /tokenize counts that."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.export.resolve import resolve_model
    from toolkit.export.vision_language import load_vision_language
    from toolkit.settings import ExportOptions

    spec = vl_export.manifest.vision_language
    tokenizer = AutoTokenizer.from_pretrained(vl_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(vl_dir, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model = load_vision_language(resolve_model(str(vl_dir), ExportOptions()))
    pixels = processor(images=[Image.open(io.BytesIO(IMAGES["wide.png"]))], return_tensors="np")
    rows = int(np.prod(pixels["image_grid_thw"][0])) // spec.merge_size ** 2
    system = {"role": "system", "content": "Describe the picture."}
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri("wide.png")}},
                                        {"type": "text", "text": "what is this?"}]}
    hf_user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}

    def transformers_ids(messages: list, **flags) -> list[int]:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, **flags)
        return tokenizer(prompt.replace(spec.image_token, spec.image_token * rows), add_special_tokens=False)["input_ids"]

    def transformers_vector(ids: list[int]) -> np.ndarray:
        ids = torch.tensor([ids])
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=(ids == spec.image_token_id).to(torch.int32),
                           pixel_values=torch.from_numpy(np.asarray(pixels["pixel_values"], np.float32)),
                           image_grid_thw=torch.from_numpy(np.asarray(pixels["image_grid_thw"]))).last_hidden_state
        return hidden[0, -1].numpy()[None]

    cases = [({"messages": [user], "add_generation_prompt": False}, [hf_user], {"add_generation_prompt": False}),
             ({"messages": [system, user], "add_generation_prompt": True}, [system, hf_user],
              {"add_generation_prompt": True}),
             ({"messages": [system, user], "continue_final_message": True}, [system, hf_user],
              {"continue_final_message": True}),
             ({"messages": [system, user]}, [system, hf_user], {})]  # its own system message: as given, vLLM's defaults
    async with async_app_client(vl_export.path, names=("vl",)) as client:
        for body, hf_messages, flags in cases:
            tokens = (await client.post("/tokenize", json=body)).json()
            assert tokens["tokens"] == transformers_ids(hf_messages, **flags), body
            r = await client.post("/v1/embeddings", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == tokens["count"]
            assert cosines(_vectors(r.json()), transformers_vector(tokens["tokens"]))[0] >= 0.99999
        plain = {"messages": [user]}  # no flags, no system message: the card's item (GME's prompt and suffix)
        tokens = (await client.post("/tokenize", json=plain)).json()
        r = await client.post("/v1/embeddings", json=plain)
        assert r.json()["usage"]["prompt_tokens"] == tokens["count"] > len(transformers_ids([hf_user]))
        item = Multimodal("what is this?", [IMAGES["wide.png"]])
        assert tokens["tokens"] == vl.encoder("multimodal").build(item, vl.prompt_text(None, None), 0, 10**6).ids
        np.testing.assert_allclose(_vectors(r.json()), vl.embed([item]), atol=1e-5)
        r = await client.post("/v1/embeddings", json={**plain, "chat_template": "{{ messages }}"})
        assert r.status_code == 400 and "--allow-request-chat-template" in r.json()["error"]["message"]
        broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}}
        hostile = [{"messages": [system, {"role": "user", "content": [broken]}], "add_generation_prompt": True},
                   {"messages": [system, {"role": "user", "content": [{"type": "audio"}]}]},
                   {"messages": [system, {"role": "user", "content": [{"type": "text", "text": "x"} for _ in range(2)],
                                          "extra": [[[[]]]]}], "chat_template_kwargs": {"deep": [[[[[[]]]]]]}}]
        for body in hostile[:2]:  # a broken image, an unknown part: 400 in OpenAI's shape, the server answers on
            for route in ("/v1/embeddings", "/tokenize"):
                r = await client.post(route, json=body)
                assert r.status_code == 400 and r.json()["error"]["message"], (route, r.text)
                assert (await client.get("/health")).status_code == 200
        assert (await client.post("/v1/embeddings", json=hostile[2])).status_code == 200  # unknown keys: ignored


@pytest.fixture(scope="module")
def live_vl(vl_export):
    url, _, proc = serve_subprocess(vl_export.path, "--served-model-name", "vl")
    yield url
    proc.kill()


def test_real_openai_and_cohere_clients(live_vl, vl):
    import cohere
    from openai import OpenAI
    from openai.types import CreateEmbeddingResponse

    expected = vl.embed([Multimodal("a red square", [IMAGES["photo.jpg"]]), Multimodal("a red square")])
    client = OpenAI(base_url=live_vl + "/v1", api_key="unused")
    parts = [{"type": "image_url", "image_url": {"url": _uri("photo.jpg")}}, {"type": "text", "text": "a red square"}]
    # vLLM's own example for chat embeddings (openai_chat_embedding_client_for_multimodal.py) posts this way
    response = client.post("/embeddings", cast_to=CreateEmbeddingResponse,
                           body={"model": "vl", "encoding_format": "float",
                                 "messages": [{"role": "user", "content": parts}]})
    np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected[:1], atol=1e-5)
    co = cohere.ClientV2(api_key="unused", base_url=live_vl)
    answer = co.embed(model="vl", inputs=[{"content": parts}, {"content": [parts[1]]}], input_type="search_document",
                      embedding_types=["float"])
    np.testing.assert_allclose(np.array(answer.embeddings.float_), expected, atol=1e-5)


def test_fp16_for_gpus_converts_both_graphs_and_is_verified(vl_dir, vl, tmp_path):
    """``--precision fp16 --target cuda``: both graphs in fp16 with fp32 inputs and outputs, held to fp16's gate
    (min cosine 0.999 against transformers on every probe item), checked where it will run (the GPU when there is
    one; here the CPU provider, which runs these graphs)."""
    from onnx import TensorProto

    from toolkit.export import export_model
    from toolkit.runtime.artifact import image_tower_path
    from toolkit.settings import ExportOptions

    result = export_model(str(vl_dir), ExportOptions(output=tmp_path / "vl16.onnx", precision="fp16", target="cuda"))
    manifest = result.manifest
    assert manifest.precision == "fp16" and manifest.target == "cuda"
    assert manifest.parity.passed and manifest.parity.threshold == 0.999
    for graph in (result.path, image_tower_path(result.path)):
        model = onnx.load(str(graph), load_external_data=False)
        kinds = {init.data_type for init in model.graph.initializer if len(init.dims) == 2}
        assert TensorProto.FLOAT16 in kinds and TensorProto.FLOAT not in kinds  # every weight matrix
        assert all(i.type.tensor_type.elem_type != TensorProto.FLOAT16 for i in (*model.graph.input, *model.graph.output))
    items = [Multimodal("a chart", [IMAGES["wide.png"]]), "a chart", Multimodal(None, [IMAGES["photo.jpg"]])]
    half = Embedder(result.path, device="cpu").embed(items)
    assert cosines(half, vl.embed(items)).min() >= 0.999


def test_probe_images_decode(vl):  # the probe set the export verifies on holds every awkward kind
    from PIL import Image

    modes = {Image.open(io.BytesIO(data)).mode for data in IMAGES.values()}
    assert {"RGB", "RGBA", "L", "P"} <= modes


def test_qwen2_5_vl_windows(tmp_path):
    """Qwen2.5-VL: most tower blocks attend within windows (2 x 2 merged groups here, so the probe images span
    several). Verified against transformers by the export, then the runtime batched against alone. (Qwen3-VL's
    position table, DeepStack and videos: tests/test_video.py.)"""
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    folder = build_tiny_qwen2_vl(tmp_path / "model", family="qwen2_5_vl")
    result = export_model(str(folder), ExportOptions(output=tmp_path / "vl.onnx"))
    spec = result.manifest.vision_language
    assert spec.family == "qwen2_5_vl" and (spec.window_size, spec.position_grid, spec.deepstack) == (56, 0, 0)
    assert spec.video is None
    assert result.manifest.parity.passed and result.manifest.parity.min_cosine["sentence_embedding"] >= 0.99999
    emb = Embedder(result.path, device="cpu")
    items = [Multimodal("a", [IMAGES["wide.png"]]), IMAGES["photo.jpg"], "just text"]
    together = emb.embed(items)
    alone = np.concatenate([emb.embed([item]) for item in items])
    assert cosines(together, alone).min() >= 0.99999


@pytest.mark.anyio
async def test_dse_queries_read_a_placeholder_image_and_their_prompt_in_the_text(tmp_path):
    """DSE (a Qwen2-VL in a folder named as dse-qwen2-2b-mrl-v1's checkpoint, so its card applies): a text query is
    "Query: <text>" after a black 56 x 56 placeholder image, a page image alone reads "What is shown in this image?",
    as vLLM's test_dse_qwen2_vl.py prompts it; verified against transformers by the export on every probe item,
    and here against the reference built by hand. The placeholder is not the caller's image: Cohere bills none."""
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    folder = build_tiny_qwen2_vl(tmp_path / "dse-qwen2-2b-mrl-v1")
    result = export_model(str(folder), ExportOptions(output=tmp_path / "dse.onnx"))
    spec = result.manifest.vision_language
    assert (spec.instruction_at, spec.placeholder_image, spec.image_only_text) == \
        ("text", 56, "What is shown in this image?")
    assert (spec.min_pixels, spec.max_pixels, result.manifest.max_seq_len) == (784, 2560 * 784, 8192)
    assert result.manifest.parity.passed and result.manifest.parity.min_cosine["sentence_embedding"] >= 0.99999
    emb = Embedder(result.path, device="cpu")
    encoder = emb.encoder("multimodal")
    query = encoder.build(Multimodal("where is the stop sign?"), "Query: ", 0, 10**6)
    assert query.ids.count(spec.image_token_id) == 4 and query.images == []  # 56 x 56: 2 x 2 merged patches
    prompt = emb.tokenizer.decode([t for t in query.ids if t != spec.image_token_id], skip_special_tokens=False)
    assert "Query: where is the stop sign?" in prompt and "<|im_start|>system\nYou are a helpful" in prompt
    page = encoder.build(Multimodal(images=[IMAGES["wide.png"]]), "", 0, 10**6)
    assert "What is shown in this image?" in emb.tokenizer.decode(page.ids, skip_special_tokens=False)

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.export.resolve import resolve_model
    from toolkit.export.vision_language import load_vision_language
    from toolkit.export.vision_language_parity import _reference

    resolved = resolve_model(str(folder), ExportOptions())
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder, min_pixels=784, max_pixels=2560 * 784)
    model, tokenizer = load_vision_language(resolved), AutoTokenizer.from_pretrained(folder)
    expected = np.stack([_reference(model, resolved, spec, tokenizer, processor, item) for item in
                         ({"text": "where is the stop sign?", "instruction": "Query: "}, {"images": [IMAGES["wide.png"]]})])
    got = np.concatenate([emb.embed(["where is the stop sign?"], prompt_name="query"), emb.embed([IMAGES["wide.png"]])])
    assert cosines(got, expected).min() >= 0.99999
    async with async_app_client(result.path, names=("dse",)) as client:
        r = await client.post("/v2/embed", json={"texts": ["where is the stop sign?"], "input_type": "search_query",
                                                 "embedding_types": ["float"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]["float"]), got[:1], atol=1e-5)
        assert not r.json()["meta"]["billed_units"].get("images")
        # MRL as the model card's get_embedding: the last state cut to the dimension, then normalized
        raw = emb.embed(["where is the stop sign?"], normalize=False)[:, :16]
        r = await client.post("/v1/embeddings", json={"input": "where is the stop sign?", "dimensions": 16})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r.json()), raw / np.linalg.norm(raw), atol=1e-5)


def test_toolkit_embed_pairs_an_image_column_with_a_text_column(vl, vl_export, tmp_path):
    """``toolkit embed --image-column image --text-column caption``: each row's image and caption are ONE item
    (a missing caption leaves the image alone, a missing or broken image is a bad row); texts alone go through the
    model's prompt as the server's do; on a two-tower artifact the pairing is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toolkit.bulk import BulkOptions, embed_files

    images = [IMAGES["wide.png"], IMAGES["photo.jpg"], b"not an image", None]
    captions = ["a chart", None, "broken", "no image"]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "image": images, "caption": captions}), tmp_path / "rows.parquet")
    options = BulkOptions(image_column="image", text_column="caption", with_text=True, id_column="id", on_error="skip")
    summary = embed_files(vl_export.path, tmp_path / "rows.parquet", tmp_path / "out", options)
    table = pq.read_table(tmp_path / "out")
    assert table.column("id").to_pylist() == [1, 2] and summary.skipped == 2
    expected = vl.embed([Multimodal("a chart", [IMAGES["wide.png"]]), Multimodal(images=[IMAGES["photo.jpg"]])])
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), expected, atol=1e-5)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "_skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [3, 4]

    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["a cat", "a dog"]) + "\n")
    embed_files(vl_export.path, tmp_path / "texts.jsonl", tmp_path / "texts", BulkOptions())
    got = np.array(pq.read_table(tmp_path / "texts").column("embedding").to_pylist())
    np.testing.assert_allclose(got, vl.embed(["a cat", "a dog"]), atol=1e-5)


def test_pairing_columns_needs_a_vision_language_artifact(clip_artifact, tmp_path):
    from toolkit.bulk import BulkOptions, embed_files
    from toolkit.errors import ConfigError

    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "x.png", "caption": "y"}) + "\n")
    options = BulkOptions(image_column="image", text_column="caption", with_text=True)
    with pytest.raises(ConfigError, match="for vision-language artifacts"):
        embed_files(clip_artifact, tmp_path / "rows.jsonl", tmp_path / "out", options)


def test_int8_keeps_the_kinds_of_layer_that_miss_the_gate_in_fp32(vl_dir, tmp_path, monkeypatch):
    """Where int8 everywhere misses the gate, the search measures each kind of layer alone and keeps the longest
    harmless-first run of kinds that passes; the rest stay fp32 and the manifest names them. The tiny model passes
    0.99 with everything in int8, so the gate is raised to 0.9999 here to make the search work."""
    from toolkit.export import export_model, vision_language_parity
    from toolkit.export.int8_weights import weight_gemms
    from toolkit.export.vision_language_int8 import module_kinds
    from toolkit.runtime.artifact import image_tower_path
    from toolkit.settings import ExportOptions

    monkeypatch.setitem(vision_language_parity.THRESHOLDS, "int8", 0.9999)
    result = export_model(str(vl_dir), ExportOptions(output=tmp_path / "vl8.onnx", precision="int8"))
    manifest = result.manifest
    assert manifest.parity.passed and manifest.parity.threshold == 0.9999
    assert manifest.parity.min_cosine["sentence_embedding"] >= 0.9999
    assert manifest.optimization["int8_vs_fp32_min_cosine"] >= 0.9999
    quantized, total = map(int, manifest.optimization["int8_matmuls"].split("/"))
    left = manifest.optimization["int8_fp32_kinds"].split("; ")
    assert 0 < quantized < total and left and all(k.startswith(("language: ", "vision: ")) for k in left)
    fp32 = [n for graph in (result.path, image_tower_path(result.path)) for n in weight_gemms(graph)]
    kinds = {f"{g}: {k}": v for g, path in (("language", result.path), ("vision", image_tower_path(result.path)))
             for k, v in module_kinds(path).items()}
    assert sorted(fp32) == sorted(n for k in left for n in kinds[k])  # exactly the named kinds are fp32
    assert all("*" in k for k in left if "layers" in k or "blocks" in k)  # a kind spans the layers


def test_int8_quantizes_both_graphs_behind_the_gate(vl_dir, tmp_path):
    """``--precision int8``: every MatMul of both graphs in int8 (dynamic, per-channel weights), the artifact then
    held to int8's gate (min cosine 0.99 against transformers on every probe item); the manifest says what was
    quantized and on which CPU the gate ran."""
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    result = export_model(str(vl_dir), ExportOptions(output=tmp_path / "vl8.onnx", precision="int8"))
    manifest = result.manifest
    assert manifest.precision == "int8" and manifest.parity.passed and manifest.parity.threshold == 0.99
    assert manifest.parity.min_cosine["sentence_embedding"] >= 0.99
    quantized, total = manifest.optimization["int8_matmuls"].split("/")
    assert quantized == total and int(total) > 10 and "int8_gated_on" in manifest.optimization
    from toolkit.export.int8_weights import weight_gemms
    from toolkit.runtime.artifact import image_tower_path

    for graph in (result.path, image_tower_path(result.path)):  # the vision tower's Gemms too, none left in fp32
        ops = [n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node]
        assert ops.count("DynamicQuantizeMatMul") > 4 and weight_gemms(graph) == []
    assert manifest.fused_ops.get("DynamicQuantizeMatMul", 0) > 4
    emb = Embedder(result.path, device="cpu")
    vectors = emb.embed([Multimodal("a chart", [IMAGES["wide.png"]]), "a chart"])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()
