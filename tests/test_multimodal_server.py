"""Images over HTTP: vLLM's messages, SGLang's items, infinity's modality, Cohere's images and inputs; remote URLs
only from allowed hosts. The real openai and cohere clients against a real `toolkit serve`."""

from __future__ import annotations

import base64
import http.server
import threading
import time

import numpy as np
import pytest
from conftest import serve_subprocess
from litestar.testing import AsyncTestClient

from toolkit.export.towers import probe_images
from toolkit.runtime import Embedder
from toolkit.server.app import create_app, load_models
from toolkit.server.images import host_allowed
from toolkit.server.metrics import Metrics
from toolkit.settings import RuntimeOptions, ServerOptions

IMAGES = probe_images()


def _uri(name: str) -> str:
    kind = "jpeg" if name.endswith(".jpg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(IMAGES[name]).decode()


class _Images(http.server.BaseHTTPRequestHandler):
    """/wide.png and friends; /big (over the size limit); /slow (past the time limit); /away (a redirect to a
    host that is not allowed)."""

    def do_GET(self):  # noqa: N802 - http.server's hook
        name = self.path.lstrip("/")
        if name == "slow":
            time.sleep(3)
        if name == "away":
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/wide.png")
            self.end_headers()
            return
        body = b"\0" * (3 * 1024 * 1024) if name == "big" else IMAGES.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def clip(clip_artifact):
    return Embedder(clip_artifact, device="cpu")


def _client(clip_artifact, image_host):
    """The tiny CLIP served as "clip", image URLs allowed from ``image_host`` only (an AsyncTestClient: use it in
    ``async with``)."""
    metrics = Metrics()
    registry = load_models([clip_artifact], ["clip"], RuntimeOptions(device="cpu"), metrics)
    options = ServerOptions(max_client_batch_size=8, allow_image_urls=[image_host], image_url_timeout_s=1.0,
                            image_url_max_bytes=1024 * 1024)
    return AsyncTestClient(create_app(registry, options, metrics))


def _vectors(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


@pytest.mark.anyio
async def test_vllm_messages_image_and_text(clip_artifact, image_host, clip):
    async with _client(clip_artifact, image_host) as client:
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri("wide.png")}}]}
        r = await client.post("/v1/embeddings", json={"model": "clip", "messages": [image], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r.json()), clip.embed_images(IMAGES["wide.png"]), atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] == clip.manifest.image.tokens == 17  # 16 patches + the class token
        text = {"role": "user", "content": [{"type": "text", "text": "a photo of a cat"}]}
        r = await client.post("/v1/embeddings", json={"messages": [text]})
        np.testing.assert_allclose(_vectors(r.json()), clip.embed("a photo of a cat"), atol=1e-5)
        mixed = {"role": "user", "content": [*text["content"], *image["content"]]}
        r = await client.post("/v1/embeddings", json={"messages": [mixed]})
        assert r.status_code == 400 and "mixes text and an image" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_sglang_items_keep_their_order(clip_artifact, image_host, clip):
    async with _client(clip_artifact, image_host) as client:
        items = [{"text": "a photo of a cat"}, {"image": _uri("tall.png")}, {"image": _uri("photo.jpg")}, {"text": "a dog"}]
        r = await client.post("/v1/embeddings", json={"input": items, "dimensions": 24})
        assert r.status_code == 200, r.text
        got = _vectors(r.json())
        np.testing.assert_allclose(got[[0, 3]], clip.embed(["a photo of a cat", "a dog"]), atol=1e-5)
        np.testing.assert_allclose(got[[1, 2]], clip.embed_images([IMAGES["tall.png"], IMAGES["photo.jpg"]]), atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] == clip.count_tokens(["a photo of a cat", "a dog"]) + 2 * 17
        r = await client.post("/v1/embeddings", json={"input": [{"text": "x", "image": _uri("tall.png")}]})
        assert r.status_code == 400 and "mixes text and an image" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_infinity_modality_image_with_base64_output(clip_artifact, image_host, clip):
    async with _client(clip_artifact, image_host) as client:
        r = await client.post("/v1/embeddings", json={"input": [_uri("rgba.png"), _uri("gray.png")], "modality": "image",
                                                      "encoding_format": "base64", "normalize": False})
        assert r.status_code == 200, r.text
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), np.float32) for d in r.json()["data"]])
        np.testing.assert_allclose(got, clip.embed_images([IMAGES["rgba.png"], IMAGES["gray.png"]], normalize=False),
                                   atol=1e-5)
        r = await client.post("/v1/embeddings", json={"input": ["x"], "modality": "audio"})
        assert r.status_code == 400 and "modality" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_cohere_images_and_inputs(clip_artifact, image_host, clip):
    async with _client(clip_artifact, image_host) as client:
        r = await client.post("/v2/embed", json={"images": [_uri("wide.png"), _uri("photo.jpg")], "input_type": "image",
                                                 "embedding_types": ["float", "int8", "binary"]})
        assert r.status_code == 200, r.text
        body = r.json()
        np.testing.assert_allclose(np.array(body["embeddings"]["float"]),
                                   clip.embed_images([IMAGES["wide.png"], IMAGES["photo.jpg"]]), atol=1e-5)
        assert len(body["embeddings"]["int8"][0]) == 24 and len(body["embeddings"]["binary"][0]) == 3
        assert body["meta"]["billed_units"] == {"input_tokens": 0, "image_tokens": 34, "images": 2}
        assert body["images"][1] == {"width": 120, "height": 80, "format": "jpeg", "bit_depth": 8}
        as_object = {"type": "image_url", "image_url": {"url": _uri("tall.png")}}
        as_string = {"type": "image_url", "image_url": _uri("tall.png")}  # as some of Cohere's cloud partners send it
        r = await client.post("/v2/embed", json={"inputs": [{"content": [as_object]}, {"content": [as_string]},
                                                            {"content": [{"type": "text", "text": "a cat"}]}]})
        got = np.array(r.json()["embeddings"]["float"])
        np.testing.assert_allclose(got[0], got[1], atol=1e-6)
        np.testing.assert_allclose(got[2], clip.embed("a cat")[0], atol=1e-5)
        r = await client.post("/v2/embed", json={"inputs": [{"content": [as_object, {"type": "text", "text": "x"}]}]})
        assert r.status_code == 400 and "mixes text and an image" in r.json()["message"]
        r = await client.post("/v2/embed", json={"images": [_uri("wide.png")], "output_dimension": 8})
        assert r.status_code == 400 and "dimensions 8" in r.json()["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(("url", "status", "message"), [
    ("/wide.png", 200, None),
    ("/big", 400, "over the limit"),
    ("/slow", 400, "cannot fetch"),
    ("/away", 400, "not an allowed host"),
    ("/missing.png", 400, "cannot fetch"),
])
async def test_remote_urls_from_an_allowed_host(clip_artifact, clip, image_host, url, status, message):
    async with _client(clip_artifact, image_host) as client:
        r = await client.post("/v1/embeddings", json={"input": [f"http://{image_host}{url}"], "modality": "image"})
        assert r.status_code == status, r.text
        if message:
            assert message in r.json()["error"]["message"]
        else:
            np.testing.assert_allclose(_vectors(r.json()), clip.embed_images(IMAGES["wide.png"]), atol=1e-5)


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "/etc/passwd",
                                 "http://127.0.0.1:1/wide.png"])
async def test_urls_outside_the_allow_list_are_never_fetched(clip_artifact, image_host, url):
    async with _client(clip_artifact, image_host) as client:
        r = await client.post("/v1/embeddings", json={"input": [url], "modality": "image"})
        assert r.status_code == 400
        assert "not allowed" in r.json()["error"]["message"] or "data:image" in r.json()["error"]["message"]


def test_host_allow_list_forms():
    assert host_allowed("https://img.example.com/a.png", ["*.example.com"])
    assert host_allowed("http://127.0.0.1:8080/a.png", ["127.0.0.1:8080"])
    assert not host_allowed("http://127.0.0.1:8081/a.png", ["127.0.0.1:8080"])
    assert not host_allowed("http://example.com.evil.net/a.png", ["example.com"])
    assert not host_allowed("ftp://example.com/a.png", ["example.com"])


@pytest.mark.anyio
async def test_hostile_image_is_a_400_and_the_server_goes_on(clip_artifact, image_host):
    async with _client(clip_artifact, image_host) as client:
        r = await client.post("/v1/embeddings", json={"input": [_uri("wide.png"), "data:image/png;base64,"
                                                                + base64.b64encode(b"no image").decode()], "modality": "image"})
        assert r.status_code == 400 and "image 1" in r.json()["error"]["message"]
        assert (await client.post("/v1/embeddings", json={"input": [_uri("wide.png")], "modality": "image"})).status_code == 200


@pytest.mark.anyio
async def test_models_tell_the_modality_and_tokenize_stays_text(clip_artifact, image_host):
    async with _client(clip_artifact, image_host) as client:
        model = (await client.get("/v1/models")).json()["data"][0]
        assert model["modalities"] == ["text", "image"]
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri("wide.png")}}]}
        r = await client.post("/tokenize", json={"messages": [image]})
        assert r.status_code == 400 and "text only" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def live_clip(clip_artifact):
    url, _, proc = serve_subprocess(clip_artifact, "--served-model-name", "clip")
    yield url
    proc.kill()


def test_real_cohere_client_embeds_images(live_clip, clip):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=live_clip)
    response = co.embed(model="clip", images=[_uri("photo.jpg")], input_type="image",
                        embedding_types=["float", "uint8"])
    np.testing.assert_allclose(np.array(response.embeddings.float_), clip.embed_images(IMAGES["photo.jpg"]), atol=1e-5)
    assert len(response.embeddings.uint8[0]) == 24 and response.meta.billed_units.images == 1
    assert response.images[0].width == 120
    texts = co.embed(model="clip", texts=["a photo of a cat"], input_type="search_query", embedding_types=["float"])
    np.testing.assert_allclose(np.array(texts.embeddings.float_), clip.embed("a photo of a cat"), atol=1e-5)


def test_real_openai_client_with_infinity_modality(live_clip, clip):
    from openai import OpenAI

    client = OpenAI(base_url=live_clip + "/v1", api_key="unused")
    response = client.embeddings.create(model="clip", input=[_uri("wide.png")], extra_body={"modality": "image"},
                                        encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in response.data]), clip.embed_images(IMAGES["wide.png"]),
                               atol=1e-5)
    default = client.embeddings.create(model="clip", input=[_uri("wide.png")], extra_body={"modality": "image"})
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), clip.embed_images(IMAGES["wide.png"]),
                               atol=1e-5)  # the client's default base64 path too
