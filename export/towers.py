"""Two-tower models (CLIP, SigLIP): the image tower's graph, its preprocessing facts, and both towers' checks
against the model as its own processor feeds it.

The text tower goes through the usual pipeline (``export.heads.TowerHead``); this module adds:

- ``image_preprocess``: ``preprocessor_config.json`` -> ``ImagePreprocess`` (stored in the manifest);
- ``export_image_graph``: ``get_image_features`` (the projection included), normalized, as a graph with a
  dynamic batch axis over fixed-size ``pixel_values``;
- ``text_reference_check`` / ``image_parity``: the artifact vs ``get_text_features`` fed by the model's own
  tokenizer (SigLIP: padded to 64, no attention mask), and vs ``get_image_features`` fed by transformers' own
  image processor on probe images of every awkward kind, so the check covers the toolkit's preprocessing too;
- ``probe_images``: those images, encoded as a user would send them;
- ``build_image_tower`` / ``check_image_tower``: the pipeline's two steps for the tower (its graph and manifest
  entry; its parity, a ParityError when it misses).
"""

from __future__ import annotations

import io
from pathlib import Path

import msgspec
import numpy as np
import torch

from toolkit.errors import ConfigError, ParityError
from toolkit.export.architectures import ArchSpec
from toolkit.export.heads import normalize
from toolkit.export.int8_weights import quantize_weights, weight_gemms
from toolkit.export.onnx_export import torch_onnx_boundary
from toolkit.export.optimize import convert_fp16
from toolkit.export.precision import PrecisionPlan
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import ImagePreprocess, ImageTower, Manifest, ParityCase, ParityReport
from toolkit.runtime.artifact import (
    image_tower_path,  # the runtime's convention; re-exported for the exporter
)
from toolkit.settings import ExportOptions

__all__ = ["IMAGE_THRESHOLDS", "ImageFeatures", "build_image_tower", "check_image_tower", "export_image_graph", "image_parity", "image_preprocess",
           "image_tower_path", "probe_images", "quantize_image_tower", "text_reference_check"]

IMAGE_THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}  # int8: vs the fp32 model, as the text gate
_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ImageFeatures(torch.nn.Module):
    """pixel_values -> (the image embedding normalized as the card says, the projection's raw output)."""

    def __init__(self, model: torch.nn.Module, normalized: bool) -> None:
        super().__init__()
        self.model = model
        self.normalized = normalized

    def forward(self, pixel_values: torch.Tensor):
        raw = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return (normalize(raw) if self.normalized else raw, raw)


def image_preprocess(model_dir: Path, config: dict, arch: ArchSpec) -> ImagePreprocess:
    """The preprocessing facts of ``preprocessor_config.json`` (transformers' defaults for the class where a key
    is absent); ConfigError for a rule this toolkit does not reproduce."""
    import json

    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no preprocessor_config.json: the image tower's preprocessing is unknown")
    cfg = json.loads(path.read_text())
    clip = arch.image_resize == "shortest_edge"  # the architecture's default size rule (registry)
    vision = config.get("vision_config") or {}
    side = int(vision.get("image_size") or 224)
    size = cfg.get("size") or ({"shortest_edge": side} if clip else {"height": side, "width": side})
    if isinstance(size, int):
        size = {"shortest_edge": size} if clip else {"height": size, "width": size}
    if not cfg.get("do_resize", True):
        resize, dims = "none", []
    elif "shortest_edge" in size and "longest_edge" not in size:
        resize, dims = "shortest_edge", [int(size["shortest_edge"])]
    elif "height" in size and "width" in size:
        resize, dims = "fixed", [int(size["height"]), int(size["width"])]
    else:
        raise ConfigError(f"{path}: resize rule {size} is not supported (shortest_edge, or height and width)")
    crop = None
    if cfg.get("do_center_crop", clip):
        crop_size = cfg.get("crop_size") or {"height": side, "width": side}
        if isinstance(crop_size, int):
            crop_size = {"height": crop_size, "width": crop_size}
        crop = [int(crop_size["height"]), int(crop_size["width"])]
    resample = cfg.get("resample", 3)
    if resample not in _FILTERS:
        raise ConfigError(f"{path}: resample {resample} is not one of Pillow's filters 0..5")
    default_mean, default_std = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)) if clip \
        else ((0.5,) * 3, (0.5,) * 3)
    normalized = cfg.get("do_normalize", True)
    height, width = crop if crop else (dims if resize == "fixed" else [side, side])
    return ImagePreprocess(
        convert_rgb=bool(cfg.get("do_convert_rgb", True) in (True, None)), resize=resize, size=dims,
        resample=_FILTERS[resample], center_crop=crop,
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
        mean=[float(v) for v in cfg.get("image_mean", default_mean)] if normalized else None,
        std=[float(v) for v in cfg.get("image_std", default_std)] if normalized else None,
        height=int(height), width=int(width))


def export_image_graph(model: torch.nn.Module, spec: ImagePreprocess, normalized: bool, *, opset: int,
                       path: Path) -> Path:
    """The image tower as an ONNX graph (dynamo exporter): ``pixel_values`` (batch, 3, H, W) -> embeddings."""
    module = ImageFeatures(model, normalized).eval()
    example = torch.randn(2, 3, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    with torch_onnx_boundary("of the image tower"):
        program = torch.onnx.export(
            module, (example,), input_names=["pixel_values"], output_names=["image_embedding", "image_embedding_raw"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}}, dynamo=True, opset_version=opset,
            verbose=False, external_data=True)
        program.save(str(path), external_data=True)
    return path


def probe_images() -> dict[str, bytes]:
    """Encoded images of every awkward kind, deterministic: wide and tall non-square, one smaller than any crop,
    RGBA with transparency, grayscale, palette PNG with a transparent index, JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(width: int, height: int) -> np.ndarray:  # smooth gradients plus noise: resizing filters matter
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
        return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)

    def encode(image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    rgba = np.concatenate([picture(70, 50), rng.integers(0, 256, (50, 70, 1), dtype=np.uint8)], axis=-1)
    palette = Image.fromarray(picture(45, 64)).quantize(colors=16)
    palette.info["transparency"] = 3
    return {
        "wide.png": encode(Image.fromarray(picture(96, 40)), "PNG"),
        "tall.png": encode(Image.fromarray(picture(40, 96)), "PNG"),
        "small.png": encode(Image.fromarray(picture(13, 9)), "PNG"),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray.png": encode(Image.fromarray(picture(60, 60)[:, :, 0], "L"), "PNG"),
        "palette.png": encode(palette, "PNG", transparency=3),
        "photo.jpg": encode(Image.fromarray(picture(120, 80)), "JPEG", quality=90),
    }


def _processor(resolved: ResolvedModel):
    from transformers import AutoImageProcessor

    try:  # the Pillow backend: transformers' reference that needs no torchvision
        return AutoImageProcessor.from_pretrained(resolved.model_dir, backend="pil")
    except (TypeError, ValueError):
        return AutoImageProcessor.from_pretrained(resolved.model_dir)


def image_parity(emb, resolved: ResolvedModel, model: torch.nn.Module, precision: str) -> ParityReport:
    """The artifact's ``embed_images`` on the encoded probe images vs ``get_image_features`` on transformers'
    image processor's pixels for the same decoded images (batch of all, and one at a time); plus the largest
    difference between the two preprocessings' pixels."""
    from PIL import Image

    from toolkit.runtime.pooling import cosines

    images = probe_images()
    processor = _processor(resolved)
    decoded = [Image.open(io.BytesIO(data)) for data in images.values()]
    pixels = processor(images=decoded, return_tensors="np")["pixel_values"]
    ours = np.stack([item.pixels for item in emb.load_images(list(images.values()))])
    pixel_diff = float(np.abs(pixels - ours).max())
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=torch.from_numpy(np.asarray(pixels, np.float32))).pooler_output
    reference = reference.numpy()
    encoded = list(images.values())
    cases, worst = [], {}
    for label, rows in (("batch", list(range(len(encoded)))), *((name, [i]) for i, name in enumerate(images))):
        batch = [encoded[i] for i in rows]
        got = emb.embed_images(batch, normalize=False)
        cos = float(cosines(got, reference[rows]).min())
        diff = float(np.abs(got - reference[rows]).max())
        worst["image_embedding"] = min(worst.get("image_embedding", 1.0), cos)
        cases.append(ParityCase(output=f"image_embedding ({label})", batch=len(batch), seq_len=0, padded=False,
                                padding_side="none", min_cosine=cos, max_abs_diff=diff))
    threshold = IMAGE_THRESHOLDS.get(precision, IMAGE_THRESHOLDS["fp16"])
    worst["pixel_values (max abs diff vs the image processor)"] = pixel_diff
    passed = worst["image_embedding"] >= threshold and pixel_diff <= 1e-4
    return ParityReport(reference="transformers image processor + get_image_features", threshold=threshold,
                        min_cosine={"image_embedding": worst["image_embedding"]}, max_abs_diff={"pixel_values": pixel_diff},
                        cases=cases, passed=passed)


def text_reference_check(emb, resolved: ResolvedModel, model: torch.nn.Module, texts: list[str]) -> float:
    """Min cosine of the artifact's text embeddings vs ``get_text_features`` fed by the model's own tokenizer the
    way its processor feeds it (CLIP: padded to the longest with an attention mask; SigLIP: padded to
    ``max_length``, no mask)."""
    from transformers import AutoTokenizer

    from toolkit.runtime.pooling import cosines

    tok = AutoTokenizer.from_pretrained(resolved.model_dir)
    cap = emb.manifest.max_seq_len
    if resolved.card.pad_to_max_length:
        enc = tok(texts, padding="max_length", max_length=cap, truncation=True, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"]}
    else:
        enc = tok(texts, padding=True, max_length=cap, truncation=True, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        reference = model.get_text_features(**feeds).pooler_output.numpy()
    got = emb.embed(texts, normalize=False, truncate_prompt_tokens=cap)
    return float(cosines(got, reference).min())


def build_image_tower(module, resolved: ResolvedModel, options: ExportOptions, plan: PrecisionPlan,
                      tmp: Path) -> tuple[Path, ImageTower]:
    """The image tower's graph (fp16 for fp16 targets) and its manifest entry (parity filled in later)."""
    spec = image_preprocess(resolved.model_dir, resolved.config, resolved.arch)
    graph = export_image_graph(module.encoder.model, spec, resolved.card.normalize, opset=options.opset,
                               path=tmp / "image.onnx")
    if plan.converts_fp16:
        graph = convert_fp16(graph, tmp / "image-fp16.onnx")
    vision = resolved.config.get("vision_config") or {}
    patches = (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 16))) ** 2
    tokens = patches + (1 if resolved.arch.image_class_token else 0)  # CLIP adds a class token
    tower = ImageTower(embedding_dim=resolved.head.dim(resolved.config, None), tokens=tokens, preprocess=spec,
                       parity=ParityReport(reference="none", threshold=0.0, skipped=True, passed=False))
    return graph, tower


def check_image_tower(manifest: Manifest, candidate: Path, resolved: ResolvedModel, module, plan: PrecisionPlan) -> Manifest:
    """The image tower's check (``image_parity``): ParityError when it misses, else the manifest
    with its report."""
    from toolkit.runtime.embedder import Embedder

    emb = Embedder(candidate, device=plan.parity_device)
    report = image_parity(emb, resolved, module.encoder.model, plan.name)
    if not report.passed:
        raise ParityError(f"image tower parity check failed (min cosine {report.min_cosine['image_embedding']:.6f}, "
                          f"need >= {report.threshold}; pixels differ from the image processor's by up to "
                          f"{report.max_abs_diff['pixel_values']:.2e}); no artifact written", report.min_cosine)
    return msgspec.structs.replace(manifest, image=msgspec.structs.replace(manifest.image, parity=report))


def quantize_image_tower(graph: Path, tmp: Path, optimization: dict) -> tuple[Path, dict]:
    """The image tower with every weight GEMM (MatMul, and the projection's Gemm) in dynamic int8 (per-channel
    weights, ``export.int8_weights``), and what the manifest records; its accuracy gate is the tower's parity check
    at int8's threshold (``export.towers.IMAGE_THRESHOLDS``)."""
    from toolkit.cpu import describe

    count = len(weight_gemms(graph))
    return quantize_weights(graph, tmp / "image-int8.onnx"), {
        **optimization, "image_int8_matmuls": f"{count}/{count}", "text_tower": "fp32", "int8_gated_on": describe()}
