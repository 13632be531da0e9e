"""Embedder and AsyncEmbedder: options, validation, batching, output encodings."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from toolkit.errors import (
    BackendError,
    InputTooLongError,
    OverloadedError,
    RequestError,
    UnsupportedDimensionError,
)
from toolkit.runtime import AsyncEmbedder, Embedder
from toolkit.runtime.batching import plan_batches, planned_cost
from toolkit.runtime.encoding import pack_bits, quantize, to_base64, to_bytes, to_dtype
from toolkit.settings import Device

TEXTS = ["The cat sat on the mat.", "Tokenizers split text into pieces.",
         "A much longer sentence, written to make the padding in a mixed batch matter quite a lot more than the rest.", "x"]


def test_padding_invariance_and_batching(tiny):
    together = tiny.embed(TEXTS)
    alone = np.stack([tiny.embed(t)[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    small_budget = Embedder(tiny.path, device="cpu", max_batch_tokens=32, max_batch_size=2)
    np.testing.assert_allclose(small_budget.embed(TEXTS), together, atol=1e-5)


def test_left_padding_decoder_invariance(tiny_decoder_artifact):
    emb = Embedder(tiny_decoder_artifact, device="cpu")
    assert emb.card.padding_side.value == "left"
    together = emb.embed(TEXTS)
    alone = np.stack([emb.embed(t)[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    # Matryoshka "any": slice then renormalize, any size below native
    v = emb.embed(TEXTS[:1], dimensions=5)
    raw = emb.embed(TEXTS[:1], normalize=False)
    np.testing.assert_allclose(v[0], raw[0, :5] / np.linalg.norm(raw[0, :5]), atol=1e-5)
    with pytest.raises(UnsupportedDimensionError, match="1..32"):
        emb.embed("x", dimensions=33)


def test_plan_batches_budget_and_order():
    lengths = [5, 100, 7, 6, 90, 8]
    batches = plan_batches(lengths, max_batch_tokens=200, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 200 or len(batch) == 1
    assert batches[0][0] == 0 and set(batches[-1]) == {1}  # ascending; the long ones are not padded together with short ones
    assert plan_batches([3000], max_batch_tokens=200, max_batch_size=3) == [[0]]  # longer than the budget: alone
    assert plan_batches([], max_batch_tokens=200, max_batch_size=3) == []


def _best_contiguous_cost(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> float:
    """Brute force over every cut of the sorted lengths into contiguous, valid batches."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = float("inf")
    for mask in range(1 << (len(order) - 1)):
        batches, current = [], [order[0]]
        for k in range(1, len(order)):
            if mask >> (k - 1) & 1:
                batches.append(current)
                current = []
            current.append(order[k])
        batches.append(current)
        if all(len(b) <= max_batch_size and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_batch_tokens)
               for b in batches):
            best = min(best, planned_cost(lengths, batches))
    return best


def test_plan_batches_finds_the_cheapest_cut():
    rng = np.random.default_rng(1)
    for _ in range(40):
        lengths = [int(x) for x in rng.choice([3, 5, 9, 12, 30, 64, 200], size=int(rng.integers(2, 10)))]
        batches = plan_batches(lengths, max_batch_tokens=256, max_batch_size=4)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) <= 4 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256) for b in batches)
        assert planned_cost(lengths, batches) <= _best_contiguous_cost(lengths, 256, 4) + 1e-6


def test_dimensions_and_normalize(tiny):
    full = tiny.embed(TEXTS, normalize=False)
    assert full.shape == (4, 24)
    np.testing.assert_allclose(tiny.embed(TEXTS), full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)
    head = tiny.embed(TEXTS, dimensions=8)  # fused head: slice, then normalize
    np.testing.assert_allclose(head, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(tiny.embed(TEXTS, dimensions=16, normalize=False), full[:, :16], atol=1e-5)
    assert tiny.embed(TEXTS, dimensions=24).shape == (4, 24)
    with pytest.raises(UnsupportedDimensionError, match="8, 16, 24"):
        tiny.embed(TEXTS, dimensions=12)


def test_prompts(tiny):
    np.testing.assert_allclose(tiny.embed("hello", prompt_name="query"), tiny.embed("query: hello"), atol=1e-6)
    np.testing.assert_allclose(tiny.embed("hello", prompt="passage: "), tiny.embed("passage: hello"), atol=1e-6)
    with pytest.raises(RequestError, match="not one of: (query, document|document, query)"):
        tiny.embed("hello", prompt_name="qury")


def test_truncation(tiny):
    long = " ".join(["word"] * 500)
    with pytest.raises(InputTooLongError, match="This model's maximum context length is 96 tokens. However, you "
                                                "requested "):
        tiny.embed(long)
    exact = "word " * 100  # tokenized in full: the count is exact, in OpenAI's and vLLM's words
    with pytest.raises(InputTooLongError, match=rf"However, you requested {len(tiny.tokenizer.ids(exact))} tokens in the "
                                                r"input for embedding generation \(input 0\)\. Please reduce"):
        tiny.embed(exact)
    ids_right = tiny.tokenize(long + " end", truncate_prompt_tokens=10)
    ids_left = tiny.tokenize("start " + long, truncate_prompt_tokens=10, truncation_side="left")
    assert len(ids_right) == len(ids_left) == 10
    cls, sep = tiny.tokenize("a")[0], tiny.tokenize("a")[-1]
    assert ids_right[0] == cls and ids_right[-1] == sep and ids_left[0] == cls and ids_left[-1] == sep
    assert tiny.embed(long, truncate_prompt_tokens=-1).shape == (1, 24)
    no_special = tiny.tokenize("hello world", add_special_tokens=False)
    assert len(no_special) == len(tiny.tokenize("hello world")) - 2


def test_token_id_inputs_are_validated(tiny):
    ids = tiny.tokenize("hello world")
    np.testing.assert_allclose(tiny.embed(ids), tiny.embed("hello world"), atol=1e-6)
    np.testing.assert_allclose(tiny.embed([ids, ids])[1], tiny.embed("hello world")[0], atol=1e-6)
    for bad in ([10**6], [-1], [[]]):
        with pytest.raises(RequestError):
            tiny.embed(bad)
    with pytest.raises(RequestError, match="must not be empty"):
        tiny.embed([])
    with pytest.raises(RequestError):
        tiny.embed(["ok", ""])


def test_encode_token_embed_and_score(tiny):
    states = tiny.encode(TEXTS[:2], pooling_task="token_embed")
    assert [s.shape[0] for s in states] == [len(tiny.tokenize(t)) for t in TEXTS[:2]]
    np.testing.assert_allclose(tiny.encode(TEXTS, pooling_task="embed"), tiny.embed(TEXTS))
    with pytest.raises(RequestError, match="embed, token_embed"):
        tiny.encode("x", pooling_task="classify")
    one_to_n = tiny.score(TEXTS[0], TEXTS)
    assert one_to_n.shape == (4,) and abs(one_to_n[0] - 1) < 1e-5
    n_to_n = tiny.score(TEXTS, TEXTS)
    np.testing.assert_allclose(n_to_n, 1, atol=1e-5)
    with pytest.raises(RequestError):
        tiny.score(TEXTS[:2], TEXTS)


def test_tokenize_detokenize_count(tiny):
    ids = tiny.tokenize("hello world")
    assert "hello" in tiny.detokenize(ids)
    assert tiny.count_tokens(["hello world", "hello world"]) == 2 * len(ids)


def test_output_encodings():
    v = np.array([[0.5, -0.25, 1.0, -2.0, 0.0, 3.0, -1.0, 0.125, 0.375]], dtype=np.float32)
    assert np.frombuffer(base64.b64decode(to_base64(v)[0]), dtype=np.float32).tolist() == v[0].tolist()
    assert np.frombuffer(to_bytes(v, "float16", "big"), dtype=">f2").astype(np.float32).tolist() == v[0].tolist()
    bf = to_dtype(v, "bfloat16", "little")
    assert ((bf.astype(np.uint32) << 16).view(np.float32) == v).all()  # these values are exact in bfloat16
    bits = pack_bits(v)
    assert bits.tolist() == [[0b10100101, 0b10000000]]  # MSB first, bit = value > 0
    assert (quantize(v, "binary", (-1, 1), 9).astype(np.int16) == bits.astype(np.int16) - 128).all()
    u8 = quantize(v, "uint8", (-1.0, 1.0), 9)
    i8 = quantize(v, "int8", (-1.0, 1.0), 9)
    assert u8.dtype == np.uint8 and i8.dtype == np.int8
    assert (u8.astype(np.int16) - 128 == i8).all() and u8[0, 3] == 0 and u8[0, 5] == 255
    with pytest.raises(RequestError, match="float32, float16, bfloat16"):
        to_dtype(v, "fp64")


def test_provider_choice_is_explicit(tiny_artifact):
    from toolkit.errors import ConfigError
    from toolkit.runtime.session import usable_devices

    usable = usable_devices()
    assert Device.CPU in usable
    if Device.CUDA not in usable:
        with pytest.raises(ConfigError, match="available: cpu"):
            Embedder(tiny_artifact, device="cuda")


def test_a_device_that_is_no_device_names_the_devices(tiny_artifact):
    from toolkit.errors import ConfigError
    from toolkit.settings import RuntimeOptions

    for given in ({"device": "gpu"}, {"options": RuntimeOptions(device="gpu")}):
        with pytest.raises(ConfigError) as caught:
            Embedder(tiny_artifact, **given)
        assert caught.value.message == "device 'gpu' is not one of: auto, cpu, cuda, tensorrt"
        assert caught.value.exit_code == 2


def test_embedder_repr_says_what_it_runs(tiny):
    assert repr(tiny) == (f"Embedder({str(tiny.path)!r}, model={tiny.card.name!r}, tasks=['embed', 'token_embed', "
                          "'score'], dim=24, device='cpu', providers=['CPUExecutionProvider'])")


async def _gather(engine, texts, priority=0):
    return await asyncio.gather(*(engine.embed(t, priority=priority) for t in texts))


def test_async_embedder_coalesces_and_matches_solo(tiny):
    batches = []
    engine = AsyncEmbedder(tiny, on_batch=batches.append)
    try:
        texts = [TEXTS[i % 4] + f" number {i}" for i in range(64)]
        results = asyncio.run(_gather(engine, texts))
        for text, (vec, tokens) in zip(texts, results):
            np.testing.assert_allclose(vec[0], tiny.embed(text)[0], atol=1e-5)
            assert tokens == len(tiny.tokenize(text))
        assert max(b.size for b in batches) > 1, "concurrent callers were never batched together"
    finally:
        engine.close()


def test_async_embedder_bounded_queue_priority_and_cancel(tiny):
    engine = AsyncEmbedder(tiny, max_queue=8)

    async def scenario():
        with pytest.raises(OverloadedError):
            await engine.embed(["a"] * 9)
        task = asyncio.create_task(engine.embed(["cancel me"] * 4))
        await asyncio.sleep(0)
        task.cancel()
        ok = await engine.embed(TEXTS, priority=-5)
        return ok

    try:
        vectors, _ = asyncio.run(scenario())
        np.testing.assert_allclose(vectors, tiny.embed(TEXTS), atol=1e-5)
        assert engine.alive
    finally:
        engine.close()


def test_failing_batch_fails_only_its_callers(tiny, monkeypatch):
    engine = AsyncEmbedder(tiny)
    real = tiny.run_batch

    def flaky(items, outputs, modality="text", adapter=None):
        if any(len(t) == 3 for t in items):  # the one-word input
            raise BackendError("boom")
        return real(items, outputs, modality, adapter)

    monkeypatch.setattr(tiny, "run_batch", flaky)

    try:
        with pytest.raises(BackendError, match="boom"):
            asyncio.run(engine.embed(["x"]))
        vec, _ = asyncio.run(engine.embed([TEXTS[1]]))
        assert vec.shape == (1, 24) and engine.alive
    finally:
        engine.close()


@pytest.fixture(scope="module")
def minilm_pair(minilm_artifact):
    """The MiniLM artifact and sentence-transformers on the same checkpoint, with and without its Normalize module."""
    from sentence_transformers import SentenceTransformer

    from toolkit.export.resolve import default_model_dir

    st = SentenceTransformer(str(default_model_dir()), device="cpu")
    raw = SentenceTransformer(modules=[st[0], st[1]], device="cpu")  # Transformer + Pooling, no Normalize
    return Embedder(minilm_artifact, device="cpu"), st, raw


MINILM_TEXTS = [
    "What is the capital of France?",
    "ONNX Runtime runs the exported graph with IO binding on CUDA.",
    "short",
    " ".join(["A long passage about token budgets and padding that runs past the model's maximum length."] * 30),
]


@pytest.mark.parametrize("prompt", [None, "query: "])
@pytest.mark.parametrize("dims", [None, 128, 256])
@pytest.mark.parametrize("normalize", [True, False])
def test_minilm_option_combinations_match_sentence_transformers(minilm_pair, prompt, dims, normalize):
    emb, st, raw = minilm_pair
    model = st if normalize else raw
    expected = model.encode(MINILM_TEXTS, prompt=prompt, truncate_dim=dims, convert_to_numpy=True)
    got = emb.embed(MINILM_TEXTS, prompt=prompt, dimensions=dims, normalize=normalize, truncate_prompt_tokens=-1)
    assert got.shape == expected.shape == (len(MINILM_TEXTS), dims or 384)
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() >= 0.99999, cos
    if not normalize:  # un-normalized means the same vector, not only the same direction
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    else:
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # heads renormalize after slicing


def test_chat_messages_render_with_the_artifacts_template(tiny_decoder_artifact, tiny):
    emb = Embedder(tiny_decoder_artifact, device="cpu")
    assert emb.manifest.chat_template and "messages" in emb.manifest.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ONNX?"}]
    assert emb.render_chat(messages) == "<|system|>Be brief.</s>\n<|user|>What is ONNX?</s>\n"
    assert emb.render_chat(messages, add_generation_prompt=True).endswith("</s>\n<|assistant|>")
    assert emb.render_chat(messages, continue_final_message=True).endswith("<|user|>What is ONNX?")
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "ONNX?"}]}]
    assert emb.render_chat(parts) == "<|user|>What is ONNX?</s>\n"
    with pytest.raises(RequestError, match="Cannot set both"):
        emb.render_chat(messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(RequestError, match="role"):
        emb.render_chat([{"content": "no role"}])
    assert tiny.manifest.chat_template is None
    with pytest.raises(RequestError, match="no chat template"):
        tiny.render_chat(messages)
    assert tiny.render_chat(messages, chat_template="{{ messages[-1]['content'] }}") == "What is ONNX?"
    with pytest.raises(RequestError, match="chat template"):
        tiny.render_chat(messages, chat_template="{% if %}")
