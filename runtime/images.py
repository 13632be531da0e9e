"""Images for CLIP / SigLIP image towers: decoding and preprocessing with Pillow and numpy only (no torch).

Every input is one of: a ``PIL.Image.Image``, encoded bytes, a file path (``pathlib.Path``, or a ``str``
that is not a data URI), or a base64 ``data:image/...;base64,...`` URI. Decoding is guarded: the encoded size,
the pixel count (read from the header, before any pixel is decoded) and the format are checked, and a
failure names the input's index (``RequestError``) without touching the other inputs.

Preprocessing reproduces transformers' Pillow image processors step for step (``toolkit.manifest.ImagePreprocess``),
so the pixels equal what ``CLIPImageProcessor`` / ``SiglipImageProcessor`` produce from the same decoded image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit.errors import ConfigError, RequestError
from toolkit.manifest import ImagePreprocess
from toolkit.model_source import install_hint

__all__ = ["FORMATS", "IMAGE_OUTPUT", "ImageRef", "Pixels", "MAX_ASPECT", "MAX_IMAGE_BYTES", "MAX_PIXELS", "ImageInput", "as_image_list", "decode_image", "is_image_input", "is_image_uri", "load_pixels", "read_source",
           "preprocess", "require_pillow"]

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what Pillow decodes here that images come in
MAX_PIXELS = 50_000_000  # 50 megapixels: ~150 MB decoded; Pillow's own bomb limit is ~89M (a warning), then 2x that
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_ASPECT = 200  # longest side / shortest side (vLLM's Qwen-VL limit): a thin strip would resize to gigapixels

ImageInput = object  # PIL.Image.Image | bytes | str | pathlib.Path
IMAGE_OUTPUT = "image_embedding"  # the image tower's outputs: this (normalized as the card says) and its _raw


class Pixels:
    """One preprocessed image, queued like a token sequence: ``len`` is the positions the image tower reads
    (for batching budgets and usage counts); ``width``, ``height``, ``format``: the image as it came."""

    __slots__ = ("format", "height", "pixels", "tokens", "width")

    def __init__(self, pixels: np.ndarray, tokens: int, width: int = 0, height: int = 0, format: str = "") -> None:
        self.pixels = pixels
        self.tokens = tokens
        self.width, self.height, self.format = width, height, format

    def __len__(self) -> int:
        return self.tokens


class ImageRef:
    """Marks one input of a mixed list as an image (what the server builds from a request's image parts): its
    ``modality`` is declared, whatever the source looks like (``toolkit.runtime.encoders.declared_modality``)."""

    __slots__ = ("source",)
    modality = "image"

    def __init__(self, source) -> None:
        self.source = source


def require_pillow():
    """The PIL.Image module, or a ConfigError naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(f"this artifact has an image tower: images need Pillow, the [images] extra: "
                          f"{install_hint('images')}") from None
    return Image


def is_image_uri(value: object) -> bool:
    return isinstance(value, str) and value[:11].lower() == "data:image/"


def is_image_input(value: object) -> bool:
    """Whether a score / embed input is an image rather than text: a PIL image, bytes, a ``pathlib.Path`` or a
    ``data:image/`` URI (any other ``str`` is text)."""
    return (isinstance(value, (bytes, bytearray, memoryview, Path, ImageRef)) or is_image_uri(value)
            or type(value).__module__.startswith("PIL."))


def read_source(source, index: int, what: str = "image", limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of one input: bytes as they are, a ``data:<what>/<type>;base64`` URI decoded, a path read;
    RequestError naming ``what`` and ``index`` past ``limit`` bytes, for another kind of data URI, or for anything
    else."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and source[:5].lower() == "data:":
        head, sep, payload = source.partition(",")
        if not sep or not head.lower().endswith(";base64") or not head.lower().startswith(f"data:{what}/"):
            raise RequestError(f"{what} {index}: a data URI must be 'data:{what}/<type>;base64,<data>'", param="input")
        if len(payload) > limit * 4 // 3 + 4:
            raise RequestError(f"{what} {index}: larger than {limit // 2**20} MiB encoded", param="input")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{what} {index}: the data URI's base64 payload is invalid", param="input") from None
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        try:
            if path.stat().st_size > limit:
                raise RequestError(f"{what} {index}: {path} is larger than {limit // 2**20} MiB", param="input")
            data = path.read_bytes()
        except OSError as exc:
            raise RequestError(f"{what} {index}: cannot read {path}: {exc.strerror or exc}", param="input") from None
    else:
        raise RequestError(f"{what} {index}: expected bytes, a path or a data:{what} URI, got "
                           f"{type(source).__name__}", param="input")
    if len(data) > limit:
        raise RequestError(f"{what} {index}: larger than {limit // 2**20} MiB encoded", param="input")
    return data


def decode_image(source: ImageInput, index: int = 0, *, exif_transpose: bool = True):
    """One input -> a loaded PIL image (EXIF orientation applied unless told otherwise). RequestError names
    ``index`` for anything that is not a decodable image of an allowed format and size."""
    Image = require_pillow()
    from PIL import ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        if not isinstance(source, (bytes, bytearray, memoryview, str, Path)):
            raise RequestError(f"image {index}: expected an image (PIL image, bytes, path or data:image URI), got "
                               f"{type(source).__name__}", param="input")
        data = read_source(source, index)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise RequestError(f"image {index}: not an image Pillow can identify", param="input") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(f"image {index}: cannot be read: {exc}", param="input") from None
        if image.format not in FORMATS:
            raise RequestError(f"image {index}: format {image.format} is not accepted; accepted: {', '.join(FORMATS)}",
                               param="input")
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise RequestError(f"image {index}: {width}x{height} pixels is outside 1..{MAX_PIXELS} pixels "
                           "(a decompression bomb, or an image to downscale first)", param="input")
    try:
        image.load()
        if exif_transpose:
            upright = ImageOps.exif_transpose(image)
            upright.format = image.format  # kept for the caller's metadata (Cohere's response reports it)
            image = upright
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RequestError(f"image {index}: cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})",
                           param="input") from None
    return image


def _rgb(image):
    """transformers' convert_to_rgb: transparency (an alpha band, or a palette's transparent index) composited on
    white, everything else converted."""
    Image = require_pillow()
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _resize(image, spec: ImagePreprocess, index: int):
    if spec.resize == "none":
        return image
    width, height = image.size
    if spec.resize == "shortest_edge":
        edge = spec.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = edge, int(edge * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = spec.size
    if max(width, height) > MAX_ASPECT * min(width, height) or new_w * new_h > MAX_PIXELS:  # a 1 x 40000 strip
        raise RequestError(f"image {index}: {width}x{height} resizes to {new_w}x{new_h}; its aspect ratio is too "
                           "extreme", param="input")
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample=_FILTERS[spec.resample])


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C), centred; an image smaller than the crop is padded with zeros first."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return pixels[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def preprocess(image, spec: ImagePreprocess, index: int = 0) -> np.ndarray:
    """A decoded PIL image -> float32 (3, height, width) pixel values."""
    if spec.convert_rgb:
        image = _rgb(image)
    pixels = np.asarray(_resize(image, spec, index))
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.center_crop is not None:
        pixels = _center_crop(pixels, *spec.center_crop)
    if spec.rescale_factor is not None:  # in float64, then float32, as transformers rescales
        values = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
    if spec.mean is not None and spec.std is not None:
        values = (values - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if values.shape[:2] != (spec.height, spec.width) or values.shape[2] != 3:
        raise RequestError(f"image preprocessing produced {values.shape[1]}x{values.shape[0]}x{values.shape[2]}, "
                           f"the tower takes {spec.width}x{spec.height}x3", param="input")
    return np.ascontiguousarray(values.transpose(2, 0, 1))


def load_pixels(source: ImageInput, index: int, spec: ImagePreprocess, tokens: int = 0) -> Pixels:
    """Decode and preprocess one input (thread-safe; Pillow releases the GIL while it decodes and resizes)."""
    if isinstance(source, ImageRef):
        source = source.source
    image = decode_image(source, index, exif_transpose=spec.exif_transpose)
    return Pixels(preprocess(image, spec, index), tokens, image.width, image.height, (image.format or "").lower())


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list:
    """One image or a sequence of them -> a non-empty list."""
    if isinstance(images, str) or is_image_input(images):
        return [images]
    items = list(images)
    if not items:
        raise RequestError("images must not be empty", param="images")
    return items
