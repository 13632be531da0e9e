"""A ~2B-shaped Qwen2-VL embedder (Qwen2-VL-2B's configuration, random weights) exported and run on this CPU.

    python benchmarks/vl_bench.py [--workdir DIR] [--items 8] [--repeats 3] [--side 224] [--json out.json]

Steps, each in its own process so that peak memory is the step's own (``ru_maxrss``):

1. build: the model saved (bf16 on disk), with the tiny test tokenizer holding Qwen's special tokens (its ids lie
   inside the 151,936-row embedding table) and an image processor bounded to ``--side`` x ``--side`` pixels;
2. export: ``toolkit export`` of it, parity checked against transformers as every export is (peak RSS, seconds,
   artifact size: the language graph and the vision graph beside it);
3. speed: items holding one image and a text, embedded by the artifact (``Embedder.embed``) and by transformers
   (``Qwen2VLModel`` with its own image processor, the same prompts, last-token pooling), in batches of
   ``--batch``, interleaved over ``--repeats``; items/s, the ratio, and their min cosine;
4. serving: a process that opens the artifact and embeds the items (peak RSS), with neither torch nor
   transformers imported.

The first line names the CPU: ratios depend on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIG_2B = {  # Qwen/Qwen2-VL-2B-Instruct's config.json (vision tower and language model)
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
    "text": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                       "mrope_section": [16, 24, 24]}},
}


_PEAK = "\nimport json as _j, resource as _r\nprint(_j.dumps(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024))\n"


def _step(name: str, code: str) -> tuple[dict, float]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. (result, that process's peak RSS MiB)."""
    out = subprocess.run([sys.executable, "-c", code + _PEAK], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-2]), float(lines[-1])


BUILD = '''
import json, sys, torch
sys.path.insert(0, "tests")
from pathlib import Path
config = {config}
folder = Path({folder!r})
from tiny_models import _tokenizer_with, QWEN_VL_SPECIALS, QWEN_VL_CHAT_TEMPLATE
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
tok, ids = _tokenizer_with(QWEN_VL_SPECIALS)
text = {{**config["text"], "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}}
cfg = Qwen2VLConfig(text_config=text, vision_config=config["vision"], image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
torch.manual_seed(0)
model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
params = sum(p.numel() for p in model.parameters())
model.save_pretrained(folder)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                               padding_side="left")
fast.chat_template = QWEN_VL_CHAT_TEMPLATE
fast.save_pretrained(folder)
side = {side}
processor = {{"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": side * side,
             "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}}
(folder / "preprocessor_config.json").write_text(json.dumps(processor))
print(json.dumps({{"parameters": params}}))
'''

EXPORT = '''
import json, time
from toolkit.export import export_model
from toolkit.settings import ExportOptions
started = time.perf_counter()
result = export_model({folder!r}, ExportOptions(output={out!r}, precision={precision!r},
                                                 allow_low_accuracy={precision!r} == "int8"))
print(json.dumps({{"seconds": time.perf_counter() - started, "min_cosine": result.manifest.parity.min_cosine,
                  "passed": result.manifest.parity.passed, "optimization": result.manifest.optimization}}))
'''

SERVE = '''
import json, sys
from toolkit.runtime import Embedder
from toolkit.runtime.vision_language import Multimodal
emb = Embedder({out!r}, device="cpu")
images = [open(p, "rb").read() for p in {images!r}]
vectors = emb.embed([Multimodal("what does this picture show?", [image]) for image in images])
print(json.dumps({{"rows": len(vectors), "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
'''

COMMON = '''
import io, json, statistics, time
import numpy as np
folder, out, batch, repeats, text = {folder!r}, {out!r}, {batch}, {repeats}, "what does this picture show?"
images = [open(p, "rb").read() for p in {images!r}]
chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
def timed(fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vectors = np.concatenate([fn(c) for c in chunks])
        times.append(time.perf_counter() - start)
    np.save({npy!r}, vectors)
    return len(images) / statistics.median(times)
'''

TOOLKIT_SPEED = COMMON + '''
from toolkit.runtime import Embedder
from toolkit.runtime.vision_language import Multimodal
emb = Embedder(out, device="cpu")
tokens = len(emb.encoder("multimodal").build(Multimodal(text, [images[0]]), "", 0, 10**6))
rate = timed(lambda chunk: emb.embed([Multimodal(text, [b]) for b in chunk]))
print(json.dumps({{"items_per_s": rate, "tokens_per_item": tokens}}))
'''

TORCH_SPEED = COMMON + '''
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from toolkit.export.resolve import resolve_model
from toolkit.export.vision_language import load_vision_language
from toolkit.manifest import MANIFEST_KEY, decode_manifest
from toolkit.settings import ExportOptions
import onnx
torch.set_num_threads({threads})
meta = {{p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}}
spec = decode_manifest(meta[MANIFEST_KEY]).vision_language
model = load_vision_language(resolve_model(folder, ExportOptions()))
tok = AutoTokenizer.from_pretrained(folder)
proc = Qwen2VLImageProcessorPil.from_pretrained(folder, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
def reference(chunk):
    decoded = [Image.open(io.BytesIO(b)) for b in chunk]
    pix = proc(images=decoded, return_tensors="np")
    prompts = []
    for grid in pix["image_grid_thw"]:
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": text}}]}}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + spec.prompt_suffix
        prompts.append(prompt.replace(spec.image_token, spec.image_token * (int(np.prod(grid)) // spec.merge_size ** 2)))
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=torch.from_numpy(np.asarray(pix["pixel_values"], np.float32)),
                       image_grid_thw=torch.from_numpy(pix["image_grid_thw"]),
                       mm_token_type_ids=(enc["input_ids"] == spec.image_token_id).int()).last_hidden_state
    last = hidden[:, -1].numpy()  # left padding: the last position is every row's last token
    return last / np.linalg.norm(last, axis=-1, keepdims=True)
print(json.dumps({{"items_per_s": timed(reference)}}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "vl-bench")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=224, help="images are bounded to side x side pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", help="fp32 | int8 (the kinds of layer within int8's gate, "
                        "chosen by the export; written even where it misses the gate, which the report states)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from toolkit.cpu import describe

    print(f"CPU: {describe()}", flush=True)
    work = args.workdir
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    folder, out = work / "qwen2-vl-2b-shaped", work / f"qwen2-vl-2b-shaped{suffix}.onnx"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.items):
        path = work / f"image-{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    report: dict = {"cpu": describe()}
    if not (folder / "config.json").is_file():
        built, peak = _step("build", BUILD.format(config=CONFIG_2B, folder=str(folder), side=args.side))
        report["parameters"] = built["parameters"]
        print(f"built: {built['parameters'] / 1e9:.2f}B parameters (peak {peak:.0f} MiB)", flush=True)
    if not out.is_file():
        exported, peak = _step("export", EXPORT.format(folder=str(folder), out=str(out), precision=args.precision))
        size = sum(p.stat().st_size for p in work.glob(f"{out.stem}.*") if p.suffix in (".onnx", ".data"))
        report["export"] = {**exported, "peak_rss_mib": peak, "artifact_bytes": size}
        print(f"export: {exported['seconds']:.0f} s, peak RSS {peak:.0f} MiB, artifact {size / 2**30:.2f} GiB "
              f"(both graphs), parity {exported['min_cosine']} ({'passed' if exported['passed'] else 'MISSED'} its gate)",
              flush=True)
    served, peak = _step("serve", SERVE.format(out=str(out), images=paths[:2]))
    report["serving"] = {**served, "peak_rss_mib": peak}
    print(f"serving: peak RSS {peak:.0f} MiB embedding 2 items; torch imported: {served['torch']}, "
          f"transformers imported: {served['transformers']}", flush=True)
    # one engine per process (the 2B model twice in one process, fp32, would not fit 24 GiB), each over every repeat
    common = {"folder": str(folder), "out": str(out), "images": paths, "batch": args.batch, "repeats": args.repeats}
    ours, ours_peak = _step("toolkit", TOOLKIT_SPEED.format(**common, npy=str(work / "toolkit.npy")))
    theirs, theirs_peak = _step("transformers", TORCH_SPEED.format(**common, npy=str(work / "transformers.npy"),
                                                                   threads=args.threads))
    from toolkit.runtime.pooling import cosines

    agree = float(cosines(np.load(work / "toolkit.npy"), np.load(work / "transformers.npy")).min())
    ratio = ours["items_per_s"] / theirs["items_per_s"]
    report["speed"] = {"toolkit": {**ours, "peak_rss_mib": ours_peak},
                       "transformers": {**theirs, "peak_rss_mib": theirs_peak}, "ratio": ratio, "min_cosine": agree}
    print(f"items (one {args.side}x{args.side} image + a text, {ours['tokens_per_item']} tokens), batches of "
          f"{args.batch}, median of {args.repeats}: toolkit {ours['items_per_s']:.3f} items/s, transformers "
          f"{theirs['items_per_s']:.3f} items/s: {ratio:.2f}x; min cosine {agree:.6f}; peak RSS {ours_peak:.0f} MiB vs "
          f"{theirs_peak:.0f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
