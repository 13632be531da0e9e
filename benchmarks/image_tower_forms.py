"""The image tower's graph forms timed against torch: what the benchmark README's "where the time goes" says.

    .venv/bin/python benchmarks/image_tower_forms.py MODEL_DIR ARTIFACT.image.onnx [--batch 32]

Times, at one batch of random pixels and the cores available: the shipped (dynamo) graph, the TorchScript
graph, that graph through onnxruntime's transformer fuser as model_type "clip" and "vit", and torch's
get_image_features; prints images/s and the fused-operator counts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("image_tower", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    from toolkit.export.towers import ImageFeatures
    from toolkit.settings import default_threads

    threads = default_threads()
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(args.model_dir, attn_implementation="eager").eval()
    vision = model.config.vision_config
    side, heads, width = vision.image_size, vision.num_attention_heads, vision.hidden_size
    tmp = Path(tempfile.mkdtemp())
    forms = {"dynamo (shipped)": args.image_tower, "torchscript": tmp / "legacy.onnx"}
    with torch.no_grad():
        torch.onnx.export(ImageFeatures(model, True).eval(), (torch.randn(2, 3, side, side),), str(forms["torchscript"]),
                          input_names=["pixel_values"], output_names=["image_embedding", "image_embedding_raw"],
                          dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17, dynamo=False)
    for kind in ("clip", "vit"):
        with contextlib.redirect_stdout(io.StringIO()):
            fused = optimize_model(str(forms["torchscript"]), model_type=kind, num_heads=heads, hidden_size=width,
                                   opt_level=0, use_gpu=False, optimization_options=FusionOptions(kind))
        stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        forms[f"torchscript + {kind} fusions {stats}"] = tmp / f"{kind}.onnx"
        fused.save_model_to_file(str(tmp / f"{kind}.onnx"))
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return args.batch / float(np.median(times))

    for name, path in forms.items():
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        print(f"{rate(lambda s=session: s.run(['image_embedding'], {'pixel_values': pixels})):6.1f} images/s  {name}")
    with torch.inference_mode():
        print(f"{rate(lambda: model.get_image_features(pixel_values=torch.from_numpy(pixels))):6.1f} images/s  torch")


if __name__ == "__main__":
    main()
