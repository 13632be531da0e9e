"""jina-embeddings-v3 without its remote code: a tiny checkpoint in its own layout (``XLMRobertaLoRA``: rotary
positions, every Linear and Embedding LoRA-parametrized with five task adapters, ``emb_ln``, post-norm blocks)
exported to one artifact with five adapters; each task against a reference written here from jina's published math
(the task's LoRA merged into the weights, its instruction prepended, mean pooling, L2 norm); the task picked by
prompt name, adapter, served model name and Cohere's input_type."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import _export, serve_subprocess
from tiny_models import build_tiny_model

from toolkit.runtime import Embedder

TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
INSTRUCTIONS = {"retrieval.query": "Represent the query for retrieving evidence documents: ",
                "retrieval.passage": "Represent the document for retrieval: ", "separation": "",
                "classification": "", "text-matching": ""}
TEXTS = ["how do I run an onnx graph?", "the weather is sunny today", "a much longer sentence about exporting "
         "embedding models to ONNX and serving them fast, with many words in it"]
HIDDEN, LAYERS, HEADS, FFN, RANK = 32, 2, 4, 64, 4


def build_tiny_jina_v3(folder: Path, *, seed: int = 0) -> Path:
    """A random-weight checkpoint in jina-embeddings-v3's layout: config.json as jina's (XLMRobertaLoRA,
    lora_adaptations, task_instructions, rotary_emb_base, no model_type), model.safetensors with its key names
    and shapes (``roberta.`` prefix, ``parametrizations.weight.original`` / ``.0.lora_A`` / ``.0.lora_B`` on every
    Linear and Embedding, Wqkv fused), its sentence-transformers files naming jina's own module."""
    from safetensors.torch import save_file

    tokenizer_dir = build_tiny_model("xlm-roberta", folder.parent / f"{folder.name}-tokenizer")
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    pad = json.loads((tokenizer_dir / "config.json").read_text())["pad_token_id"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    weights = {}

    def lora(name: str, shape: tuple[int, int], embedding: bool) -> None:
        prefix = f"roberta.{name}.parametrizations.weight"
        weights[f"{prefix}.original"] = rand(*shape)
        if embedding:  # (num_embeddings, dim): A (5, num, r), B (5, r, dim)
            weights[f"{prefix}.0.lora_A"] = rand(len(TASKS), shape[0], RANK, scale=0.5)
            weights[f"{prefix}.0.lora_B"] = rand(len(TASKS), RANK, shape[1], scale=0.5)
        else:  # (out, in): A (5, r, in), B (5, out, r)
            weights[f"{prefix}.0.lora_A"] = rand(len(TASKS), RANK, shape[1], scale=0.5)
            weights[f"{prefix}.0.lora_B"] = rand(len(TASKS), shape[0], RANK, scale=0.5)

    lora("embeddings.word_embeddings", (vocab, HIDDEN), True)
    lora("embeddings.token_type_embeddings", (1, HIDDEN), True)
    weights["roberta.emb_ln.weight"], weights["roberta.emb_ln.bias"] = 1 + rand(HIDDEN, scale=0.1), rand(HIDDEN)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}"
        for name, shape in ((f"{p}.mixer.Wqkv", (3 * HIDDEN, HIDDEN)), (f"{p}.mixer.out_proj", (HIDDEN, HIDDEN)),
                            (f"{p}.mlp.fc1", (FFN, HIDDEN)), (f"{p}.mlp.fc2", (HIDDEN, FFN))):
            lora(name, shape, False)
            weights[f"roberta.{name}.bias"] = rand(shape[0], scale=0.05)
        for norm in ("norm1", "norm2"):
            weights[f"roberta.{p}.{norm}.weight"] = 1 + rand(HIDDEN, scale=0.1)
            weights[f"roberta.{p}.{norm}.bias"] = rand(HIDDEN, scale=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    config = {"architectures": ["XLMRobertaLoRA"],
              "auto_map": {"AutoConfig": "jinaai/xlm-roberta-flash-implementation--configuration_xlm_roberta.XLMRobertaFlashConfig",
                           "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"},
              "vocab_size": vocab, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "intermediate_size": FFN, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "type_vocab_size": 1,
              "max_position_embeddings": 8194, "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
              "pad_token_id": pad, "bos_token_id": 0, "eos_token_id": 2, "lora_adaptations": TASKS,
              "task_instructions": INSTRUCTIONS, "lora_rank": RANK, "lora_alpha": 1, "lora_dropout_p": 0.0,
              "lora_main_params_trainable": False, "matryoshka_dimensions": [8, 16, 32], "use_flash_attn": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "transformer", "path": "", "type": "custom_st.Transformer"},
        {"idx": 1, "name": "pooler", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "normalizer", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


def jina_reference(folder: Path, texts: list[str], task: str | None) -> np.ndarray:
    """jina's ``encode(texts, task=task)`` written from its published math, not from the exporter's code: the
    task's LoRA merged (Linear ``W + s B[t] A[t]``, Embedding ``E + s A[t] B[t]``, s = alpha / rank), its
    instruction prepended, post-norm blocks with NeoX rotary positions 0.. over the whole head, exact GELU, mean
    pooling over the mask, L2 norm. ``task=None``: the base weights, no instruction."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "config.json").read_text())
    raw = load_file(str(folder / "model.safetensors"))
    t = None if task is None else config["lora_adaptations"].index(task)
    scale = config["lora_alpha"] / config["lora_rank"]

    def weight(name: str, embedding: bool = False) -> torch.Tensor:
        prefix = f"roberta.{name}.parametrizations.weight"
        w = raw[f"{prefix}.original"]
        if t is None:
            return w
        a, b = raw[f"{prefix}.0.lora_A"][t], raw[f"{prefix}.0.lora_B"][t]
        return w + scale * (a @ b if embedding else b @ a)

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), raw[f"roberta.{name}.weight"], raw[f"roberta.{name}.bias"],
                                              config["layer_norm_eps"])

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")  # no auto_map
    prompt = config["task_instructions"][task] if task else ""
    batch = tok([prompt + text for text in texts], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        x = torch.nn.functional.embedding(ids, weight("embeddings.word_embeddings", True))
        x = norm(x + weight("embeddings.token_type_embeddings", True)[0], "emb_ln")
        n, seq, _ = x.shape
        d = HIDDEN // HEADS
        inv = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(seq).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(v):  # (n, heads, seq, d)
            half = v.shape[-1] // 2
            return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

        bias = (1 - mask[:, None, None, :].float()) * -1e9
        for i in range(LAYERS):
            p = f"encoder.layers.{i}"
            qkv = x @ weight(f"{p}.mixer.Wqkv").T + raw[f"roberta.{p}.mixer.Wqkv.bias"]
            q, k, v = (z.view(n, seq, HEADS, d).transpose(1, 2) for z in qkv.split(HIDDEN, -1))
            att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d) + bias, -1) @ v
            out = att.transpose(1, 2).reshape(n, seq, HIDDEN) @ weight(f"{p}.mixer.out_proj").T
            x = norm(x + out + raw[f"roberta.{p}.mixer.out_proj.bias"], f"{p}.norm1")
            h = torch.nn.functional.gelu(x @ weight(f"{p}.mlp.fc1").T + raw[f"roberta.{p}.mlp.fc1.bias"])
            x = norm(x + h @ weight(f"{p}.mlp.fc2").T + raw[f"roberta.{p}.mlp.fc2.bias"], f"{p}.norm2")
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    # named as the Hub's, so the bundled card applies (its default task: text-matching, as vLLM serves it)
    folder = build_tiny_jina_v3(tmp_path_factory.mktemp("jina") / "jina-embeddings-v3")
    return folder, _export(str(folder), folder.parent / "jina-v3.onnx")


def test_the_export_carries_the_five_tasks_as_adapters(jina):
    manifest = jina[1].manifest
    assert [a.name for a in manifest.adapters] == TASKS and all(a.passed for a in manifest.adapters)
    assert all(a.rank == RANK and a.alpha == 1 for a in manifest.adapters)
    targets = manifest.adapters[0].targets
    assert any(t.endswith("embeddings.word_embeddings") for t in targets)
    assert any(t.endswith("attention.self.query.inner") for t in targets)
    assert manifest.card.prompts == INSTRUCTIONS and manifest.card.prompt_adapters == {t: t for t in TASKS}
    assert manifest.card.pooling.value == "mean" and manifest.card.matryoshka_dims == [8, 16]
    assert manifest.parity.passed


def test_each_task_equals_the_reference_built_from_its_weights(jina):
    folder, result = jina
    emb = Embedder(result.path, device="cpu")
    base = jina_reference(folder, TEXTS, None)
    for task in TASKS:
        expected = jina_reference(folder, TEXTS, task)
        assert np.abs(expected - base).max() > 1e-2  # the task's LoRA changes the answer: the check can fail
        np.testing.assert_allclose(emb.embed(TEXTS, prompt_name=task), expected, atol=1e-5)
        np.testing.assert_allclose(emb.embed(TEXTS, adapter=task), expected, atol=1e-5)  # its prompt follows
        np.testing.assert_allclose(Embedder(result.path, device="cpu", adapter=task).embed(TEXTS), expected, atol=1e-5)
    # no task named: the bundled card's default (text-matching); the base model (jina's encode(task=None)) with an
    # explicit empty prompt and no adapter
    np.testing.assert_allclose(emb.embed(TEXTS), jina_reference(folder, TEXTS, "text-matching"), atol=1e-5)
    np.testing.assert_allclose(emb.embed(TEXTS, prompt="", adapter=None), base, atol=1e-5)


def test_without_a_card_no_task_is_the_base_model(tmp_path):
    """A checkpoint no bundled card names: no default task, so a call without one runs jina's encode(task=None)."""
    folder = build_tiny_jina_v3(tmp_path / "my-jina", seed=1)
    result = _export(str(folder), tmp_path / "my-jina.onnx", skip_parity=True)
    assert result.manifest.card.default_prompt_name is None
    emb = Embedder(result.path, device="cpu")
    np.testing.assert_allclose(emb.embed(TEXTS), jina_reference(folder, TEXTS, None), atol=1e-5)
    np.testing.assert_allclose(emb.embed(TEXTS, prompt_name="retrieval.passage"),
                               jina_reference(folder, TEXTS, "retrieval.passage"), atol=1e-5)


def test_the_cohere_client_and_served_names_pick_the_task(jina):
    import cohere

    folder, result = jina
    url, _, proc = serve_subprocess(result.path, ready="/health")
    try:
        co = cohere.ClientV2(api_key="unused", base_url=url)
        for input_type, task in (("search_query", "retrieval.query"), ("search_document", "retrieval.passage"),
                                 ("classification", "classification"), ("clustering", "separation")):
            got = co.embed(model="jina-embeddings-v3", texts=TEXTS, input_type=input_type, embedding_types=["float"])
            np.testing.assert_allclose(np.asarray(got.embeddings.float_), jina_reference(folder, TEXTS, task),
                                       atol=1e-5, err_msg=input_type)
        for body, task in (({"model": "retrieval.passage"}, "retrieval.passage"),
                           ({"model": "jina-embeddings-v3", "task": "retrieval.query"}, "retrieval.query")):
            r = httpx.post(url + "/v1/embeddings", json={**body, "input": TEXTS})
            assert r.status_code == 200, r.text
            got = np.asarray([d["embedding"] for d in r.json()["data"]])
            np.testing.assert_allclose(got, jina_reference(folder, TEXTS, task), atol=1e-5, err_msg=str(body))
        models = httpx.get(url + "/v1/models").json()["data"]
        assert {m["id"] for m in models} >= {"jina-embeddings-v3", *TASKS}
        r = httpx.post(url + "/v1/embeddings", json={"model": "jina-embeddings-v3", "task": "summarize", "input": TEXTS})
        assert r.status_code == 400 and "retrieval.query" in r.text
    finally:
        proc.kill()
