"""A random-weight BERT of bge-base's shape, in sentence-transformers layout, for the GPU benchmark.

    .venv/bin/python benchmarks/synthetic_model.py OUT_DIR [--layers 12 --hidden 768 --heads 12]

bge-base-en-v1.5 is a BERT with 12 layers, hidden size 768, 12 heads, FFN 3072, CLS pooling and
normalization. The Hub is out of reach here, so this builds that shape with random weights and
all-MiniLM-L6-v2's (bundled) tokenizer: speed depends on the shape, not on the weights. Then:

    toolkit export OUT_DIR --precision fp16 --target cuda -o bge-base-fp16.onnx
    toolkit bench bge-base-fp16.onnx --against OUT_DIR --batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out: Path, *, layers: int, hidden: int, heads: int) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from toolkit.export.resolve import default_model_dir

    source = default_model_dir()
    config = BertConfig.from_pretrained(source)
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = layers, hidden, heads
    config.intermediate_size = 4 * hidden
    config.max_position_embeddings = 512
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(config).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args()
    print(build(args.out, layers=args.layers, hidden=args.hidden, heads=args.heads))


if __name__ == "__main__":
    main()
