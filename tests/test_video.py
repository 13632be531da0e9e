"""Qwen3-VL videos (issue #22): frame lists and video files through the export's two graphs, against transformers'
own functions (its video smart_resize, frame sampling, patchify, timestamps, placeholder text) and the model's own
video forward; PyAV decoding; every HTTP way of sending a video, through the real openai client; refusals."""

from __future__ import annotations

import base64
import io
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import async_app_client, serve_subprocess
from tiny_models import build_tiny_qwen2_vl

from toolkit.errors import RequestError
from toolkit.export.towers import probe_images
from toolkit.runtime import Embedder
from toolkit.runtime.pooling import cosines
from toolkit.runtime.video import (
    Video,
    frame_pairs,
    frame_size,
    resize_frames,
    sample_indices,
    timestamps,
)
from toolkit.runtime.vision_language import Multimodal

FPS = 10


@pytest.fixture(scope="module")
def q3_export(tmp_path_factory):
    """A tiny Qwen3-VL in a folder named as Qwen3-VL-Embedding-2B's checkpoint: its card's instruction and video
    sampling (1 frame a second, at most 64 frames, 7,864,320 pixels over all frames) apply."""
    from toolkit.export import export_model
    from toolkit.settings import ExportOptions

    folder = build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen3-vl") / "Qwen3-VL-Embedding-2B", family="qwen3_vl")
    return export_model(str(folder), ExportOptions(output=folder.parent / "q3.onnx"))


@pytest.fixture(scope="module")
def q3(q3_export):
    return Embedder(q3_export.path, device="cpu")


def _frames(count: int, height: int = 45, width: int = 70) -> list[np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    return [np.stack([(x * 3 + k * 20) % 256, (y * 5 + k * 9) % 256, ((x + y) * 2 + k * 31) % 256], -1).astype(np.uint8)
            for k in range(count)]


def _mp4(frames: list[np.ndarray], fps: int = FPS) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def test_preprocessing_matches_transformers_and_torch():
    """Sizes, patches, timestamps and sampling are transformers' own functions' answers; the resize is torch's
    antialiased bicubic (what torchvision runs on uint8 frames) to the rounding of exact ties."""
    import torch
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
        smart_resize,
    )
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    flipped = total = 0
    for h0, w0, h, w in [(45, 70, 64, 96), (480, 640, 96, 128), (7, 500, 32, 448), (33, 33, 64, 96), (300, 20, 96, 32)]:
        frames = rng.integers(0, 256, (3, h0, w0, 3), dtype=np.uint8)
        ours = resize_frames(frames, h, w)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        ref = torch.nn.functional.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
        ref = ref.clamp(0, 255).round().permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - ref).max() <= 1.0
        flipped, total = flipped + int((ours != ref).sum()), total + ours.size
    assert flipped / total < 1e-4  # float32 sums a hair either side of .5
    spec = SimpleNamespace(patch_size=16, merge_size=2, temporal_patch_size=2)
    for cap in (0, 768 * 32 * 32):
        facts = SimpleNamespace(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, frame_cap=cap)
        for n, height, width in [(4, 480, 640), (7, 20, 900), (2, 40, 40), (64, 1080, 1920), (9, 3000, 31)]:
            ref_max = 32 * 32 * 768
            if cap:  # transformers' cap_pixels_per_frame
                ref_max = max(min(cap, ref_max // n), int(128 * 32 * 32 * 1.05)) * n
            assert frame_size(n, height, width, spec, facts) == smart_resize(n, height, width, 2, 32, 128 * 32 * 32,
                                                                             ref_max)
    x = rng.standard_normal((5, 64, 96, 3)).astype(np.float32)
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(x).permute(0, 3, 1, 2)[None], 16, 2, 2)
    assert (t, gh, gw) == (3, 4, 6)
    np.testing.assert_array_equal(np.concatenate(frame_pairs(x, spec)), patches[0].numpy())
    for indices, fps in [([0, 3, 6, 9, 12], 2.0), (list(range(8)), 29.97)]:
        assert timestamps(indices, fps, 2) == pytest.approx(Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2))
    facts = SimpleNamespace(fps=1.0, min_frames=4, max_frames=64)
    for total, rate in [(300, 30.0), (12, 10.0), (3, 24.0), (100000, 25.0), (50, None)]:
        processor = SimpleNamespace(fps=facts.fps, min_frames=4, max_frames=64)
        expected = Qwen3VLVideoProcessor.sample_frames(processor, VideoMetadata(total_num_frames=total, fps=rate))
        np.testing.assert_array_equal(sample_indices(total, rate, facts), expected)


def test_the_export_verifies_video_items_against_the_models_own_video_forward(q3_export, q3):
    """Qwen3-VL: a learned 8 x 8 position table resampled per image, DeepStack rows of two tower blocks added at the
    image (and video) tokens after the first two language layers; the card's default instruction as the system
    message; every probe item (images and videos) verified against transformers by the export."""
    spec = q3_export.manifest.vision_language
    assert spec.family == "qwen3_vl" and (spec.window_size, spec.position_grid, spec.deepstack) == (0, 8, 2)
    assert q3_export.manifest.card.prompts["document"] == "Represent the user's input." and spec.prompt_suffix == ""
    assert q3_export.manifest.parity.min_cosine["sentence_embedding"] >= 0.99999
    assert spec.video is not None and (spec.video.fps, spec.video.max_frames, spec.video.max_pixels) == (1.0, 64, 7864320)
    assert spec.video.token == "<|video_pad|>" and spec.video.vision_start == "<|vision_start|>"
    cases = {c.output: c.min_cosine for c in spec.parity.cases}
    for name in ("video", "text+video", "text+video+image"):
        assert cases[f"sentence_embedding ({name})"] >= 0.99999
    assert spec.parity.passed


def test_frame_lists_batch_and_count(q3):
    frames = [_png(f) for f in _frames(5)]
    items = [Video(frames, fps=2), Multimodal("what happens", videos=[Video(frames, fps=2)]), "just text",
             Multimodal("the clip and a photo", [probe_images()["photo.jpg"]], [Video(frames, fps=2)])]
    together = q3.embed(items)
    alone = np.concatenate([q3.embed([item]) for item in items])
    assert cosines(together, alone).min() >= 0.99999
    # the frame rate is part of the prompt (each pair's time): the same frames at another rate embed differently
    assert cosines(q3.embed([Video(frames, fps=0.5)]), together[:1]).min() < 0.99999
    built = q3.encoder("multimodal").build(Multimodal(videos=[Video(frames, fps=2)]), "", 0, 10**6)
    pairs = len(built.feeds)
    assert pairs == 3  # 5 frames: the last repeated into the third pair


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def test_a_video_file_is_sampled_as_transformers_samples_it(q3):
    import av

    data = _mp4(_frames(30))  # 3 seconds at 10 fps: the card's 1 frame a second, at least 4 frames
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    indices = sample_indices(len(decoded), FPS, q3.manifest.vision_language.video)
    assert indices.tolist() == [0, 10, 19, 29]
    from_file = q3.embed([Video(source=data), Multimodal("a clip", videos=[Video(source=data)])])
    as_frames = Video([_png(decoded[i]) for i in indices], fps=FPS)
    # a frame list is read at its own rate, so its frame times are 0, 0.1, 0.2, 0.3 s; the file's are its indices'
    assert cosines(q3.embed([as_frames]), from_file[:1]).min() < 0.99999
    file_times = timestamps(indices.tolist(), FPS, 2)
    assert file_times == [0.5, 2.4]
    with pytest.raises(RequestError, match="cannot be decoded|no video stream"):
        q3.embed([Video(source=b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)])


def test_bad_videos_are_refused_and_pyav_is_named_when_missing(q3, monkeypatch):
    frames = [_png(f) for f in _frames(3)]
    cases = [
        (Video(frames + [_png(_frames(1, 20, 20)[0])]), "frames differ in size"),
        (Video([frames[0]] * 65), "at most 64"),
        (Multimodal(videos=[Video(frames)] * 5), "at most 4"),
        (Video([]), "has no frames"),
        (Video(frames + [b"not an image"]), "image 0"),
        ("a text holding <|video_pad|> itself", "video placeholders"),  # no video: still not a feature row
        (Video(source="data:image/png;base64,AAAA"), "must be 'data:video/"),
    ]
    for item, message in cases:
        with pytest.raises(RequestError, match=message):
            q3.embed([item])
    with pytest.raises(RequestError, match="fps must be a number"):
        Video(frames, fps=0)
    monkeypatch.setattr("toolkit.runtime.video.MAX_DECODED_FRAMES", 10)
    with pytest.raises(RequestError, match="30 frames; a video takes 1 to 10"):
        q3.embed([Video(source=_mp4(_frames(30)))])
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(RequestError, match=r"\[video\] extra"):
        q3.embed([Video(source=b"whatever")])


def _video_uri(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.mark.anyio
async def test_http_videos_in_vllm_and_sglang_shapes(q3_export, q3):
    data = _mp4(_frames(20))
    expected = q3.embed([Multimodal("what happens?", videos=[Video(source=data)]), Video(source=data)])
    video = {"type": "video_url", "video_url": {"url": _video_uri(data)}}
    async with async_app_client(q3_export.path, names=("q3",)) as client:
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["modalities"] == ["text", "image", "multimodal", "video"]
        r = await client.post("/v1/embeddings", json={"messages": [
            {"role": "user", "content": [video, {"type": "text", "text": "what happens?"}]}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), expected[:1], atol=1e-5)
        r = await client.post("/v1/embeddings", json={"input": [{"video": _video_uri(data)},
                                                                {"text": "what happens?", "video": _video_uri(data)}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), expected[[1, 0]], atol=1e-5)
        for body, message in [
            ({"input": [{"video": "https://example.com/v.mp4"}]}, "data:video"),
            ({"input": [{"video": "/etc/passwd"}]}, "data:video"),
            ({"input": [{"video": "data:video/mp4;base64,AAAA"}]}, "cannot be decoded|no video stream"),
            ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]}, "video_url must"),
        ]:
            r = await client.post("/v1/embeddings", json=body)
            assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
            assert any(m in r.json()["error"]["message"] for m in message.split("|")), r.text
        assert (await client.get("/health")).status_code == 200


@pytest.fixture(scope="module")
def media_host():
    """A local HTTP server: /clip.mp4 (a 20-frame video), /photo.jpg, /big.mp4 (over the test's 64 KiB limit)."""
    import http.server
    import threading

    files = {"/clip.mp4": (_mp4(_frames(20)), "video/mp4"), "/photo.jpg": (probe_images()["photo.jpg"], "image/jpeg"),
             "/big.mp4": (b"\0" * (96 * 1024), "video/mp4")}

    class Media(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's hook
            if self.path not in files:
                self.send_error(404)
                return
            body, kind = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()  # no Content-Length: the limit is enforced while reading
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Media)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


@pytest.mark.anyio
async def test_video_urls_are_fetched_from_allowed_hosts_only(q3_export, q3, media_host):
    """vLLM fetches a video_url's http(s) URL; here only from hosts the operator allows (--allow-media-url), within
    the size limit. An item holding a fetched video and a fetched image keeps both."""
    host, files = media_host
    data, photo = files["/clip.mp4"][0], files["/photo.jpg"][0]
    expected = q3.embed([Multimodal("what happens?", images=[photo], videos=[Video(source=data)])])
    parts = [{"type": "video_url", "video_url": {"url": f"http://{host}/clip.mp4"}},
             {"type": "image_url", "image_url": {"url": f"http://{host}/photo.jpg"}},
             {"type": "text", "text": "what happens?"}]
    async with async_app_client(q3_export.path, names=("q3",), allow_image_urls=[host],
                                video_url_max_bytes=64 * 1024) as client:
        r = await client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), expected, atol=1e-5)
        for url, message in [(f"http://{host}/big.mp4", "over the limit of 65536 bytes"),
                             (f"http://{host}/missing.mp4", "cannot fetch"),
                             ("http://example.com/clip.mp4", "--allow-media-url"),
                             (f"http://{host}/photo.jpg", "is served as image/jpeg, not a video"),
                             ("file:///etc/passwd", "an http(s) URL")]:
            r = await client.post("/v1/embeddings", json={"input": [{"video": url}]})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (url, r.text)
        assert (await client.get("/health")).status_code == 200


def test_the_real_openai_client_sends_a_video(q3_export, q3):
    from openai import OpenAI
    from openai.types import CreateEmbeddingResponse

    url, _, proc = serve_subprocess(q3_export.path, "--served-model-name", "q3")
    try:
        data = _mp4(_frames(20))
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        parts = [{"type": "video_url", "video_url": {"url": _video_uri(data)}}, {"type": "text", "text": "a clip"}]
        response = client.post("/embeddings", cast_to=CreateEmbeddingResponse,
                               body={"model": "q3", "encoding_format": "float",
                                     "messages": [{"role": "user", "content": parts}]})
        expected = q3.embed([Multimodal("a clip", videos=[Video(source=data)])])
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected, atol=1e-5)
    finally:
        proc.kill()
