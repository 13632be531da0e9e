"""A random-weight CLIP of ViT-B/32's shape (openai/clip-vit-base-patch32), for the image benchmark.

    .venv/bin/python benchmarks/synthetic_clip.py OUT_DIR

Vision: ViT-B/32 (12 layers, width 768, 12 heads, 224-pixel images, 32-pixel patches); text: 12 layers,
width 512, 8 heads, CLIP's real 49408-token BPE vocabulary (scripts/setup.sh unpacks it); projection 512;
openai's preprocessor_config.json (shortest edge 224, bicubic, center crop 224). The Hub is out of reach
here: speed depends on the shape, not on the weights. Then:

    toolkit export OUT_DIR -o clip-b32.onnx
    toolkit bench clip-b32.onnx --images 256 --against OUT_DIR --batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build(out: Path) -> Path:
    import torch
    from tiny_models import clip_tokenizer
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 32}
    out.mkdir(parents=True, exist_ok=True)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).eval().save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
