"""fp32 parity of every architecture path on tiny synthetic models: one table row per path.

    python benchmarks/arch_parity.py

Exports a tiny random model of each registry key (text ones), each generic-decoder architecture, the
bidirectional form of each decoder that has it, a remote-code model and BGE-M3's layout, and prints the
export's own parity (min cosine over batch 1/4, padded/unpadded, short/medium/max inputs) per output.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import GENERIC_DECODERS, build_remote_code_model, build_tiny_model  # noqa: E402

from toolkit.cards import Pooling  # noqa: E402
from toolkit.export import export_model  # noqa: E402
from toolkit.export.architectures import ARCHITECTURES  # noqa: E402
from toolkit.settings import ExportOptions  # noqa: E402


def row(label: str, folder: Path, **options) -> dict:
    result = export_model(str(folder), ExportOptions(output=folder.parent / f"{folder.name}.onnx", **options))
    parity = result.manifest.parity
    return {"path": label, "reference": parity.reference, "min_cosine": min(parity.min_cosine.values()),
            "outputs": {k: round(v, 9) for k, v in parity.min_cosine.items()}}


def main() -> None:
    import torch

    work = Path(tempfile.mkdtemp(prefix="arch-parity-"))
    rows = []
    for model_type, spec in sorted(ARCHITECTURES.items()):
        if spec.image_tower:
            continue
        pooling = Pooling.LAST_TOKEN if spec.decoder else Pooling.MEAN
        rows.append(row(model_type, build_tiny_model(model_type, work / model_type), pooling=pooling))
    for model_type in sorted(GENERIC_DECODERS):
        rows.append(row(f"{model_type} (generic decoder)", build_tiny_model(model_type, work / model_type)))
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2"):
        folder = build_tiny_model(model_type, work / f"{model_type}-bi")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "is_causal": False}))
        rows.append(row(f"{model_type} (bidirectional)", folder))
    rows.append(row("remote code (auto_map)", build_remote_code_model(work / "remote"), pooling=Pooling.MEAN,
                    trust_remote_code=True))
    m3 = build_tiny_model("xlm-roberta", work / "m3")
    torch.manual_seed(3)
    torch.save(torch.nn.Linear(32, 1).state_dict(), m3 / "sparse_linear.pt")
    torch.save(torch.nn.Linear(32, 32).state_dict(), m3 / "colbert_linear.pt")
    rows.append(row("bge-m3 layout (dense + sparse + colbert)", m3, pooling=Pooling.CLS))
    print("| path | reference | min cosine (all outputs) | 1 - min cosine |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['reference']} | {r['min_cosine']:.9f} | {1 - r['min_cosine']:.1e} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
