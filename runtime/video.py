"""Videos for Qwen3-VL embedders without torch: a list of frames, or a video file decoded with PyAV (the
``[video]`` extra), sampled, sized and cut into the vision graph's inputs as transformers' ``Qwen3VLVideoProcessor``
and ``Qwen3VLProcessor`` do (the processor vLLM runs).

1. Sampling (a file only; a frame list is taken as it is): ``fps`` frames per second of the video's duration,
   within [min_frames, max_frames] and the frames it has, at ``linspace(0, total - 1, n)`` rounded.
2. One size for every frame: both sides rounded to multiples of ``patch * merge`` (32), then scaled as a whole so
   the pixels of ALL frames together (frames rounded to pairs) stay within [min_pixels, max_pixels].
3. Each frame resized with an antialiased bicubic filter (a = -0.5, support widened by the scale when shrinking),
   in float32, then clamped to [0, 255] and rounded: torchvision's resize of uint8 frames, which transformers'
   video processor calls (``resize_frames``); then ``(x - 255 mean) / (255 std)``.
4. Frames in pairs (the last repeated when their count is odd): each pair is one grid of patches whose temporal
   axis holds the two frames, which the vision tower reads as it reads an image (it attends within a frame pair),
   so each pair is one run of the vision graph.
5. The prompt: the chat template writes ``<|vision_start|><|video_pad|><|vision_end|>`` once per video; it becomes
   ``<t seconds><|vision_start|>`` + one ``<|video_pad|>`` per feature row + ``<|vision_end|>`` per pair, ``t`` the
   mean of the pair's frame times (frame index / fps) to one decimal.

Checked against transformers' functions and the model's own video forward in ``tests/test_video.py``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from toolkit.errors import RequestError
from toolkit.model_source import install_hint
from toolkit.runtime.qwen_vl import scaled_size

__all__ = ["MAX_DECODED_FRAMES", "MAX_VIDEO_BYTES", "Video", "VideoRef", "decode_video", "expand_videos", "frame_pairs", "frame_size", "prepare_video",
           "resize_frames", "sample_indices", "timestamps", "video_prompt"]

MAX_VIDEO_BYTES = 256 * 1024 * 1024
MAX_DECODED_FRAMES = 10_000  # frames a file may hold (decoding walks them all): ~5.5 minutes at 30 fps
MAX_FRAME_PIXELS = 8_300_000  # 4K UHD: a frame past this is refused before its pixels are kept


class Video:
    """One video in an item: ``frames`` (PIL images, encoded image bytes, paths or data URIs; taken as they are,
    ``fps`` the rate they were taken at, default the model's sampling rate) or ``source`` (a video file's bytes
    or path, or a ``data:video/...;base64`` URI; sampled at the model's rate; needs the ``[video]`` extra)."""

    __slots__ = ("fps", "frames", "source")
    modality = "video"

    def __init__(self, frames: Sequence | None = None, *, source=None, fps: float | None = None) -> None:
        if (frames is None) == (source is None):
            raise RequestError("a video is either a list of frames or a source (a file, bytes or data:video URI)",
                               param="input")
        if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 240):
            raise RequestError(f"a video's fps must be a number in (0, 240], got {fps!r}", param="input")
        self.frames, self.source, self.fps = (list(frames) if frames is not None else None), source, fps

    def __repr__(self) -> str:
        return f"Video(frames={len(self.frames)})" if self.frames is not None else "Video(source=...)"


class VideoRef:
    """A request's video part (a ``video_url``): its modality is declared, whatever the source looks like."""

    __slots__ = ("source",)
    modality = "video"

    def __init__(self, source) -> None:
        self.source = source


def require_av():
    """The ``av`` module (PyAV), or a RequestError naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise RequestError("video files need PyAV, the [video] extra, on the serving machine: "
                           f"{install_hint('video')}; or send the video as a list of frames", param="input") from None
    return av


def sample_indices(total: int, video_fps: float | None, facts) -> np.ndarray:
    """Which frames of a ``total``-frame video at ``video_fps`` are read: transformers' ``sample_frames`` (fps
    frames per second, within [min_frames, max_frames] and ``total``; 24 fps assumed when the file has none)."""
    rate = video_fps or 24.0
    count = int(total / rate * facts.fps)
    count = min(max(count, facts.min_frames), facts.max_frames, total)
    return np.linspace(0, total - 1, count).round().astype(int)


class _Frames:
    """Frames resized as they arrive (so a long or large video never sits decoded in memory): the size is fixed by
    the first frame and the count (``frame_size``), and every later frame must have the first one's size."""

    def __init__(self, count: int, spec, index: int) -> None:
        self.count, self.spec, self.index = count, spec, index
        self.shape: tuple | None = None
        self.size: tuple[int, int] | None = None
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
            self.size = frame_size(self.count, frame.shape[0], frame.shape[1], self.spec, self.spec.video, self.index)
        elif frame.shape != self.shape:
            raise RequestError(f"video {self.index}: its frames differ in size ({self.shape[1]}x{self.shape[0]}, "
                               f"{frame.shape[1]}x{frame.shape[0]}); a video's frames share one", param="input")
        self.frames.append(resize_frames(frame[None], *self.size)[0])


def decode_video(source, spec, index: int = 0) -> tuple[np.ndarray, list[int], float]:
    """A video file -> (its sampled frames resized, float32 (N, h, w, 3), their indices, the file's fps)."""
    from toolkit.runtime.images import read_source

    av = require_av()
    data = read_source(source, index, "video", MAX_VIDEO_BYTES)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise RequestError(f"video {index}: the file has no video stream", param="input")
            stream = container.streams.video[0]
            if stream.codec_context.width * stream.codec_context.height > MAX_FRAME_PIXELS:
                raise RequestError(f"video {index}: frames of {stream.codec_context.width}x"
                                   f"{stream.codec_context.height} are past {MAX_FRAME_PIXELS} pixels", param="input")
            fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames
            if total <= 0:  # the container does not say: count by decoding, up to the bound
                total = 0
                for _ in container.decode(stream):
                    total += 1
                    if total > MAX_DECODED_FRAMES:
                        break
                container.seek(0)
            if total <= 0 or total > MAX_DECODED_FRAMES:
                raise RequestError(f"video {index}: {total} frames; a video takes 1 to {MAX_DECODED_FRAMES}",
                                   param="input")
            indices = sample_indices(total, fps, spec.video).tolist()
            kept, frames, wanted = [], _Frames(len(indices), spec, index), set(indices)
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    frames.add(frame.to_ndarray(format="rgb24"))
                    kept.append(n)
                if n >= indices[-1]:
                    break
    except RequestError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise RequestError(f"video {index}: cannot be decoded: {exc}", param="input") from None
    if len(kept) != len(indices):  # the container counted more frames than it decodes
        raise RequestError(f"video {index}: {len(kept)} of its {total} frames decode; the file is damaged",
                           param="input")
    return np.stack(frames.frames), kept, fps or 24.0


def frame_size(frames: int, height: int, width: int, spec, facts, index: int = 0) -> tuple[int, int]:
    """The (height, width) every frame is resized to (transformers' video ``smart_resize``): multiples of
    ``patch * merge``; the pixels of the frames, their count rounded to pairs, within the bounds."""
    factor, pair = spec.patch_size * spec.merge_size, spec.temporal_patch_size
    max_pixels = facts.max_pixels
    if facts.frame_cap:  # cap_pixels_per_frame: a share of the budget per frame, at most frame_cap
        max_pixels = max(min(facts.frame_cap, facts.max_pixels // frames), int(facts.min_pixels * 1.05)) * frames
    if height < factor or width < factor:
        grow = max(factor / height, factor / width)
        height, width = int(height * grow), int(width * grow)
    if max(height, width) > 200 * min(height, width):
        raise RequestError(f"video {index}: {width}x{height} frames have an aspect ratio past 200:1", param="input")
    return scaled_size(height, width, factor, facts.min_pixels, max_pixels, frames=frames, pair=pair)


def _taps(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, taps) source indices and float32 weights of an antialiased bicubic resize along one axis."""
    scale = np.float32(size / out)
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    inv = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    center = scale * (np.arange(out, dtype=np.float32) + np.float32(0.5))
    low = np.maximum((center - support + np.float32(0.5)).astype(np.int64), 0)
    high = np.minimum((center + support + np.float32(0.5)).astype(np.int64), size)
    width = int((high - low).max())
    offsets = np.arange(width)
    x = np.abs((offsets[None, :] + low[:, None] - center[:, None] + np.float32(0.5)) * inv).astype(np.float32)
    a = np.float32(-0.5)
    weights = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0)).astype(np.float32)
    weights[offsets[None, :] >= (high - low)[:, None]] = 0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(low[:, None] + offsets[None, :], size - 1), weights


def _resample(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    index, weights = _taps(x.shape[axis], out)
    moved = np.moveaxis(x, axis, 0)
    total = moved[index[:, 0]] * weights[:, 0].reshape((-1,) + (1,) * (moved.ndim - 1))
    for k in range(1, index.shape[1]):
        total += moved[index[:, k]] * weights[:, k].reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(total, 0, axis)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, height, width, 3) float32 of whole values: width then height resampled with the
    antialiased bicubic filter in float32, clamped, rounded (half to even), as torchvision resizes uint8 frames."""
    x = frames.astype(np.float32)
    if x.shape[2] != width:
        x = _resample(x, 2, width)
    if x.shape[1] != height:
        x = _resample(x, 1, height)
    return np.round(np.clip(x, 0, 255)) if x.shape != frames.shape else x


def frame_pairs(frames: np.ndarray, spec) -> list[np.ndarray]:
    """Normalized (N, h, w, 3) float32 frames -> one (grid_h * grid_w, 3 * T * p * p) patch array per pair of
    frames, laid out as the image patches are (merge blocks first, then channel, frame, row, column)."""
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if pad := -len(frames) % t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    _, height, width, _ = frames.shape
    gh, gw = height // p, width // p
    x = frames.transpose(0, 3, 1, 2).reshape(-1, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (pairs, h/m, w/m, m, m, C, T, p, p)
    return [np.ascontiguousarray(pair.reshape(gh * gw, 3 * t * p * p)) for pair in x]


def timestamps(indices: Sequence[int], fps: float, pair: int) -> list[float]:
    """Each frame pair's time in seconds: the mean of its first and last frame's index / fps (the last index
    repeated to fill the final pair), as transformers' Qwen3VLProcessor computes it."""
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % pair)
    seconds = [i / fps for i in indices]
    return [(seconds[i] + seconds[i + pair - 1]) / 2 for i in range(0, len(seconds), pair)]


def video_prompt(times: Sequence[float], rows: int, facts) -> str:
    """The text that stands for one video in the prompt: per frame pair, its time and its ``rows`` placeholders."""
    return "".join(f"<{t:.1f} seconds>{facts.vision_start}{facts.token * rows}{facts.vision_end}" for t in times)


def load_frames(video: Video, spec, index: int) -> tuple[np.ndarray, list[int], float]:
    """A ``Video`` -> (its frames resized, float32 (N, h, w, 3) of whole values, their indices, fps)."""
    from toolkit.runtime.images import _rgb, decode_image

    if video.frames is None:
        return decode_video(video.source, spec, index)
    if not video.frames:
        raise RequestError(f"video {index} has no frames", param="input")
    if len(video.frames) > spec.video.max_frames:
        raise RequestError(f"video {index} has {len(video.frames)} frames; this model reads at most "
                           f"{spec.video.max_frames} per video", param="input")
    frames = _Frames(len(video.frames), spec, index)
    for frame in video.frames:
        frames.add(np.asarray(_rgb(decode_image(frame, index))))
    return np.stack(frames.frames), list(range(len(video.frames))), float(video.fps or spec.video.fps)


def prepare_video(video, spec, family, index: int) -> tuple[list[dict[str, np.ndarray]], list[int], list[tuple], str]:
    """One ``Video`` (or ``VideoRef``) of an item -> each frame pair's vision-graph feeds, feature-row counts and
    grids, and the prompt text that stands for the video (``video_prompt``). ``spec``: the manifest's
    vision_language; ``family``: its image side (``runtime.qwen_vl.QwenImages``), which lays out the feeds."""
    facts = spec.video
    frames, indices, fps = load_frames(video if isinstance(video, Video) else Video(source=video.source), spec, index)
    # transformers' fused rescale and normalize: (x - 255 mean) / (255 std), in float32
    mean = np.asarray(facts.mean, np.float32) * np.float32(255.0)
    std = np.asarray(facts.std, np.float32) * np.float32(255.0)
    pairs = frame_pairs((frames - mean) / std, spec)
    grid = (1, frames.shape[1] // spec.patch_size, frames.shape[2] // spec.patch_size)
    rows = grid[1] * grid[2] // spec.merge_size ** 2
    times = timestamps(indices, fps, spec.temporal_patch_size)
    return [family.feeds(p, grid) for p in pairs], [rows] * len(pairs), [grid] * len(pairs), video_prompt(times, rows, facts)


def expand_videos(prompt: str, stand_ins: Sequence[str], facts, index: int) -> str:
    """``prompt`` with the chat template's one placeholder per video (start, pad, end) replaced, in order, by each
    video's text (``video_prompt``)."""
    if not stand_ins:
        return prompt
    mark = facts.vision_start + facts.token + facts.vision_end
    parts = prompt.split(mark)
    if len(parts) == 1:
        raise RequestError(f"input[{index}] has a video, and this model's chat template writes no video part",
                           param="input")
    if len(parts) != len(stand_ins) + 1:
        raise RequestError(f"input[{index}]: the prompt holds {len(parts) - 1} video placeholders for "
                           f"{len(stand_ins)} videos (the text may not contain them itself)", param="input")
    return parts[0] + "".join(text + rest for text, rest in zip(stand_ins, parts[1:]))
