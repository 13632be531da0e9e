"""Beyond the registry's fixed list: any causal LM (the generic decoder path), decoders read bidirectionally,
and models that ship their own code. Each is checked against transformers run independently of the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import (  # noqa: E402
    GENERIC_DECODERS,
    add_sentence_transformers_layout,
    build_remote_code_model,
    build_tiny_model,
)

from toolkit.cards import Pooling  # noqa: E402
from toolkit.errors import ConfigError, UnsupportedArchitectureError  # noqa: E402
from toolkit.export import export_model  # noqa: E402
from toolkit.export.architectures import ARCHITECTURES  # noqa: E402
from toolkit.runtime import Embedder  # noqa: E402
from toolkit.settings import ExportOptions  # noqa: E402

TEXTS = ["a short one", "a somewhat longer sentence about tokenizers, padding and attention masks", "x"]


def _export(folder: Path, out: Path, **options):
    return export_model(str(folder), ExportOptions(output=out, **options))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("base_class", [False, True], ids=["causal-lm", "base-class"])
@pytest.mark.parametrize("model_type", sorted(GENERIC_DECODERS))
def test_any_causal_lm_exports_by_the_generic_decoder_path(model_type, base_class, tmp_path):
    """Saved as *ForCausalLM, or as the base class (``architectures: ["GraniteModel"]``)."""
    from transformers import AutoModel

    assert model_type not in ARCHITECTURES
    folder = build_tiny_model(model_type, tmp_path / "model", base_class=base_class)
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    assert architecture.endswith("Model" if base_class else "ForCausalLM"), architecture
    result = _export(folder, tmp_path / "a.onnx")
    m = result.manifest
    assert (m.card.pooling, m.card.padding_side.value, m.card.normalize) == (Pooling.LAST_TOKEN, "left", True)
    assert any(w.startswith(f"converted: '{model_type}' is not in the registry") for w in m.warnings), m.warnings
    assert m.parity.passed and min(m.parity.min_cosine.values()) >= 0.99999, m.parity.min_cosine
    # independent reference: transformers' own base model, the last token's hidden state of each text alone
    emb = Embedder(result.path, device="cpu")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    reference = np.stack([_hidden(model, t.ids)[-1].numpy() for t in emb.tokenize_inputs(TEXTS)])
    assert _cosines(emb.embed(TEXTS), reference).min() >= 0.99999


def test_an_unknown_encoder_is_refused_naming_the_supported(tmp_path):
    folder = build_tiny_model("bert", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "distilbert",
                                                    "architectures": ["DistilBertModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="'distilbert' is not supported; supported: bert, clip"):
        _export(folder, tmp_path / "a.onnx", pooling=Pooling.MEAN)


@pytest.mark.parametrize(("model_type", "architecture", "vision"), [
    # VLM2Vec-Full's config.json: a causal LM by its class name, its vision side in img_processor / embd_layer
    ("phi3_v", "Phi3VForCausalLM", {"img_processor": {"model_name": "openai/clip-vit-large-patch14-336"},
                                    "embd_layer": {"embedding_cls": "image", "use_hd_transform": True}}),
    ("llama_nemotron_vl", "LlamaNemotronVLModel", {"vision_config": {"model_type": "siglip_vision_model"}}),
])
def test_a_vision_language_model_without_export_support_is_refused_not_exported_as_text(model_type, architecture,
                                                                                         vision):
    """Phi-3-V (VLM2Vec) and Llama-Nemotron-VL ship their modeling code in their Hub repositories only; their class
    names say causal LM / remote code, which would otherwise export the text side and silently drop images."""
    from toolkit.export.architectures import get_arch

    config = {"model_type": model_type, "architectures": [architecture], **vision,
              "auto_map": {"AutoConfig": "configuration.Config", "AutoModelForCausalLM": "modeling.Model",
                           "AutoModel": "modeling.Model"}}
    with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}' is a vision-language model .* "
                                                           "supported: llava_next, qwen2_5_vl, qwen2_vl, qwen3_vl"):
        get_arch(model_type, config)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])
def test_bidirectional_decoder_matches_transformers_without_the_causal_mask(model_type, tmp_path):
    from transformers import AutoModel

    folder = build_tiny_model(model_type, tmp_path / "model")
    # the reference model is loaded before the config says is_causal=false (transformers 5 honours that key itself)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_causal": False}))  # as the config says
    result = _export(folder, tmp_path / "bi.onnx")
    card = result.manifest.card
    assert card.bidirectional and card.pooling == Pooling.MEAN  # padding: the tokenizer's own side (left here)
    assert result.manifest.parity.passed and min(result.manifest.parity.min_cosine.values()) >= 0.99999
    emb = Embedder(result.path, device="cpu")
    got = emb.embed(TEXTS)  # one padded batch
    # independent reference: transformers' SDPA path with every attention module's is_causal turned off, each text
    # alone (no mask at all), mean over its tokens
    items = emb.tokenize_inputs(TEXTS)
    causal = np.stack([_hidden(model, t.ids).mean(0).numpy() for t in items])
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    bidirectional = np.stack([_hidden(model, t.ids).mean(0).numpy() for t in items])
    assert _cosines(got, bidirectional).min() >= 0.99999
    assert _cosines(causal, bidirectional).min() < 0.999, "the mask made no difference: the test would prove nothing"


def test_bidirectional_comes_from_cards_and_encoders_refuse_it(tmp_path):
    from toolkit.cards import load_card
    from toolkit.export.resolve import resolve_model

    assert load_card("gte-Qwen2-7B-instruct").bidirectional and load_card("llama-nemotron-embed-1b-v2").bidirectional
    assert not load_card("Qwen3-Embedding-0.6B").bidirectional
    qwen2 = build_tiny_model("qwen2", tmp_path / "qwen2")
    assert not resolve_model(str(qwen2), ExportOptions()).card.bidirectional  # causal unless told
    bert = build_tiny_model("bert", tmp_path / "bert")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    with pytest.raises(ConfigError, match="'bert' cannot be exported bidirectional here"):
        resolve_model(str(bert), ExportOptions(pooling=Pooling.MEAN))


def test_remote_code_needs_the_flag_then_exports_with_parity(tmp_path):
    from transformers import AutoModel

    folder = build_remote_code_model(tmp_path / "remote")
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(folder), "--pooling", "mean", "-o",
                           str(tmp_path / "r.onnx")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "pass --trust-remote-code" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    result = _export(folder, tmp_path / "r.onnx", pooling=Pooling.MEAN, trust_remote_code=True)
    assert result.manifest.model_type == "tiny_remote"
    assert result.manifest.parity.passed and min(result.manifest.parity.min_cosine.values()) >= 0.99999
    emb = Embedder(result.path, device="cpu")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    reference = np.stack([_hidden(model, t.ids).mean(0).numpy() for t in emb.tokenize_inputs(TEXTS)])
    assert _cosines(emb.embed(TEXTS), reference).min() >= 0.99999


def test_a_sentence_transformers_folder_with_remote_code_is_checked_against_sentence_transformers(tmp_path):
    """The Transformer module carries its own modeling code (auto_map): the parity reference loads it trusting
    that code, as its user does, and the export passes against sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    folder = add_sentence_transformers_layout(build_remote_code_model(tmp_path / "remote"), pooling="mean",
                                              trust_remote_code=True)
    result = _export(folder, tmp_path / "r.onnx", trust_remote_code=True)
    parity = result.manifest.parity
    assert parity.passed and parity.reference == "sentence-transformers", parity
    (st_case,) = [c for c in parity.cases if c.output == "sentence_embedding (sentence-transformers)"]
    assert st_case.min_cosine >= 0.99999
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    got = Embedder(result.path, device="cpu").embed(TEXTS)
    assert _cosines(got, st.encode(TEXTS, convert_to_numpy=True)).min() >= 0.99999


def test_gritlm_pools_the_text_after_its_instruction_like_vllm(tmp_path, monkeypatch):
    """Mean over the tokens after the instruction's end marker (vLLM's GritLM pooler), bidirectional; the marker is
    the card's token strings. The tiny tokenizer spells "<|embed|>\\n" its own way, so the test card names those."""
    from transformers import AutoModel, AutoTokenizer

    from toolkit.cards import ModelCard, load_card
    from toolkit.export import resolve as resolve_module

    assert load_card("GritLM-7B").instruction_end_tokens == ["|", "embed", "|", ">", "<0x0A>"]
    folder = build_tiny_model("mistral", tmp_path / "grit")
    tok = AutoTokenizer.from_pretrained(folder)
    marker = tok.convert_ids_to_tokens(tok("<|embed|>\n", add_special_tokens=False)["input_ids"])
    card = ModelCard(name="tiny-grit", source="tiny/grit", pooling=Pooling.MEAN, max_seq_len=96, bidirectional=True,
                     padding_side="right", instruction_end_tokens=marker,
                     prompts={"query": "<|user|>\nFind the passage\n<|embed|>\n", "document": "<|embed|>\n"})
    monkeypatch.setattr(resolve_module, "find_card", lambda name: card)
    result = _export(folder, tmp_path / "grit.onnx")
    assert result.manifest.card.instruction_end_tokens == marker
    assert result.manifest.parity.passed and min(result.manifest.parity.min_cosine.values()) >= 0.99999
    emb = Embedder(result.path, device="cpu")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    marker_ids = tok.convert_tokens_to_ids(marker)

    def reference(ids: list[int]) -> np.ndarray:  # vLLM: first occurrence of the marker, pool after it; else after BOS
        hits = [i for i in range(len(ids) - len(marker_ids) + 1) if ids[i:i + len(marker_ids)] == marker_ids]
        start = hits[0] + len(marker_ids) if hits else 1
        return _hidden(model, ids)[start:].mean(0).numpy()

    for prompt_name in ("query", "document"):
        items = emb.tokenize_inputs(TEXTS, prompt_name=prompt_name)
        expected = np.stack([reference(t.ids) for t in items])
        got = emb.embed(TEXTS, prompt_name=prompt_name)
        assert _cosines(got, expected).min() >= 0.99999, prompt_name
    # pooling the instruction's tokens too (a plain mean) is another vector: the marker search made the difference
    plain = np.stack([_hidden(model, t.ids).mean(0).numpy() for t in emb.tokenize_inputs(TEXTS, prompt_name="query")])
    assert _cosines(emb.embed(TEXTS, prompt_name="query"), plain).min() < 0.9999
