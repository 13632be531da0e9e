"""The embedded engine: ``Embedder`` with offline embed / encode / score (vLLM-style)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from toolkit.cards import PaddingSide
from toolkit.errors import ConfigError, RequestError
from toolkit.manifest import HeadSpec, ImagePreprocess
from toolkit.runtime.artifact import open_artifact
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.encoders import open_encoders
from toolkit.runtime.images import Pixels, as_image_list
from toolkit.runtime.outputs import OutputPlan, finish, matryoshka_card, plan_output
from toolkit.runtime.pooling import Inputs, as_input_list
from toolkit.runtime.tasks import TASKS, Prepared, embed_items, sparse_items, task_for
from toolkit.runtime.tokenization import Tokenized, Tokenizer
from toolkit.settings import Device, RuntimeOptions, parse_device

__all__ = ["Embedder", "Inputs"]


class Embedder:
    """Runs one artifact's tasks (embed, score, rerank, classify, token and sparse embeddings; images for two-tower
    artifacts) in the caller's thread, through the task table (``toolkit.runtime.tasks``).

    >>> emb = Embedder("all-MiniLM-L6-v2.onnx")
    >>> emb.embed(["a", "b"]).shape
    (2, 384)
    """

    def __init__(self, artifact: str | os.PathLike, *, device: str | Device | None = None, options: RuntimeOptions | None = None,
                 **overrides) -> None:
        """Open ``artifact``: an artifact file, or a card name / Hub id / model directory exported before into
        ``TOOLKIT_CACHE`` (``toolkit.export.ensure_artifact`` exports one: ``Embedder(ensure_artifact(MODEL))``).

        ``device`` overrides ``options.device`` when given (default: ``options.device``, itself "auto"); one that
        is not a :class:`Device` name is a ConfigError naming those.
        """
        base = options or RuntimeOptions()
        if device is not None:
            overrides["device"] = parse_device(device)
        self.options = msgspec.structs.replace(base, **overrides)
        loaded = open_artifact(artifact, self.options)
        self.path = loaded.path
        self.session = loaded.session
        self.manifest = manifest = loaded.manifest
        self.model_card = loaded.model_card
        self.card = matryoshka_card(manifest.card, self.options, manifest.embedding_dim)  # + the options' switch
        self.tokenizer = Tokenizer(loaded.tokenizer_json, max_length=manifest.max_seq_len)
        self.padding = PaddingSide(self.card.padding_side)
        self.encoders = open_encoders(self, loaded.path)  # one per modality the manifest lists
        self._check_defaults()

    def __repr__(self) -> str:
        return (f"Embedder({str(self.path)!r}, model={self.card.name!r}, tasks={list(self.tasks)}, "
                f"dim={self.dimensions}, device={self.device.value!r}, providers={self.session.providers})")

    def _check_defaults(self) -> None:
        """The options' default prompt, checked once against the card (ConfigError naming its prompts)."""
        name, text = self.options.default_prompt_name, self.options.default_prompt
        if name is not None and text is not None:
            raise ConfigError("give a default prompt name or a default prompt, not both")
        if name is not None and name not in self.card.prompts:
            raise ConfigError(f"default prompt name '{name}' is not one of this model's prompts: "
                              f"{', '.join(self.card.prompts) or '(it has none)'}")

    def encoder(self, modality: str):
        """This artifact's encoder for ``modality``; RequestError naming the ones it has."""
        if modality not in self.encoders:
            raise RequestError(f"this {self.kind} artifact reads {', '.join(self.encoders)} only; it has no "
                               f"{modality} encoder" + (" (no image tower)" if modality == "image" else ""),
                               param="input")
        return self.encoders[modality]

    @property
    def image_spec(self) -> ImagePreprocess:
        """How images are preprocessed for the image tower (RequestError when this artifact has none)."""
        return self.encoder("image").spec

    @property
    def head(self) -> HeadSpec:
        """What this artifact is and the tasks it answers, as its manifest records them."""
        return self.manifest.head_spec

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this artifact reads: its encoders (one per modality its manifest lists)."""
        return tuple(self.encoders)

    @property
    def kind(self) -> str:
        return self.head.label

    # ---------------------------------------------------------------- inputs
    @property
    def device(self) -> Device:
        return self.session.device

    @property
    def dimensions(self) -> int:
        return self.manifest.embedding_dim

    def prompt_text(self, prompt_name: str | None, prompt: str | None) -> str:
        """The prompt a text gets: the call's ``prompt`` or ``prompt_name``, else the options' default prompt
        (``default_prompt`` / ``default_prompt_name``), else the card's default prompt name, else none."""
        if prompt is not None and prompt_name is not None:
            raise RequestError("give prompt or prompt_name, not both", param="prompt_name")
        if prompt is not None:
            return prompt
        if prompt_name is None and self.options.default_prompt is not None:
            return self.options.default_prompt
        name = prompt_name if prompt_name is not None else (self.options.default_prompt_name
                                                            or self.card.default_prompt_name)
        if name is None:
            return ""
        if name not in self.card.prompts:
            valid = ", ".join(self.card.prompts) or "(this model has no prompts)"
            raise RequestError(f"prompt_name '{name}' is not one of: {valid}", param="prompt_name")
        return self.card.prompts[name]

    def tokenize_inputs(
        self,
        inputs: Inputs,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_prompt_tokens: int | None = None,
        truncation_side: str = "right",
        add_special_tokens: bool = True,
    ) -> list[Tokenized]:
        """Inputs in any accepted form -> validated token sequences."""
        truncate_prompt_tokens = self.truncation(truncate_prompt_tokens)
        if truncation_side not in ("right", "left"):
            raise RequestError(f"truncation_side '{truncation_side}' is not one of: right, left", param="truncation_side")
        items = as_input_list(inputs)
        if isinstance(items[0], str):
            if any(not t for t in items):
                raise RequestError("input strings must not be empty", param="input")
            prefix = self.prompt_text(prompt_name, prompt)
            texts = [prefix + t for t in items] if prefix else items
            return self.tokenizer.encode(texts, add_special_tokens=add_special_tokens, truncate=truncate_prompt_tokens,
                                         side=truncation_side, max_embed_len=self.options.max_embed_len)
        nested = not isinstance(inputs, str) and len(inputs) > 0 and isinstance(inputs[0], (list, tuple))
        return [self.tokenizer.from_ids(ids, truncate=truncate_prompt_tokens, side=truncation_side,
                                        index=i if nested else None) for i, ids in enumerate(items)]

    def truncation(self, truncate_prompt_tokens: int | bool | None) -> int | None:
        """A call's truncation as the tokenizer takes it: None (not given) is -1, cut to the window, under
        ``auto_truncate`` and None (too long is an error) otherwise; False (the call refuses truncation) is None."""
        if truncate_prompt_tokens is False:
            return None
        if truncate_prompt_tokens is None and self.options.auto_truncate:
            return -1
        return truncate_prompt_tokens

    # ---------------------------------------------------------------- engine
    def run_batch(self, items: Sequence[Tokenized] | Sequence[Pixels], outputs: Sequence[str],
                  modality: str = "text") -> list[np.ndarray]:
        """One batch of ``modality``'s model inputs through its graph: (batch, ...) arrays in ``outputs`` order."""
        return self.encoder(modality).run(items, outputs)

    def run(self, items: Sequence[Tokenized] | Sequence[Pixels], output: str, modality: str = "text",
            on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Length-sorted token-budget batches of ``modality``'s model inputs (``on_batch(n)`` told each batch of n
        done); one array per input, in input order."""
        results: list[np.ndarray | None] = [None] * len(items)
        batches = plan_batches([len(t) for t in items], max_batch_tokens=self.options.max_batch_tokens,
                               max_batch_size=self.options.max_batch_size)
        for batch in batches:
            (out,) = self.run_batch([items[i] for i in batch], [output], modality)
            for row, index in enumerate(batch):
                results[index] = out[row]
            if on_batch is not None:
                on_batch(len(batch))
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- outputs
    @property
    def cross_encoder(self) -> bool:
        """A reranker artifact: it scores (query, document) pairs instead of embedding texts."""
        return self.head.pairs

    @property
    def text_classifier(self) -> bool:
        """It labels inputs and scores no pairs (a model with several labels; a one-label cross-encoder scores)."""
        return "classify" in self.tasks and "score" not in self.tasks

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task table's entries this artifact answers (its manifest's head says which)."""
        return tuple(self.head.tasks)

    def require(self, task: str) -> None:
        """RequestError naming what this artifact answers when it does not answer ``task`` (a task of the table
        that builds on another, as rerank on score, applies where that one does)."""
        entry = TASKS.get(task)
        if not (entry.applies(self) if entry is not None else task in self.tasks):
            raise RequestError(f"this {self.kind} artifact does not answer '{task}'; it answers: "
                               f"{', '.join(self.tasks)}", param="model")

    def plan_output(self, dimensions: int | None, normalize: bool | None, *, modality: str = "text") -> OutputPlan:
        """The graph output (of ``modality``'s encoder) for (dimensions, normalize): ``toolkit.runtime.outputs``."""
        return plan_output(self, dimensions, normalize, modality)

    def quantize(self, vectors: np.ndarray, kind: str) -> np.ndarray:
        """Cohere's int8 / uint8 / binary / ubinary of unit ``vectors``, over the range calibrated at export."""
        from toolkit.runtime.encoding import quantize

        return quantize(vectors, kind, tuple(self.manifest.quantization_range or (-1.0, 1.0)), self.dimensions)

    # ---------------------------------------------------------------- public API
    def perform(self, task: str, *inputs, **params):
        """Run the task table's ``task`` (``toolkit.runtime.tasks``) on ``inputs`` in this thread: its checks and
        preparation, its runs one after the other, its reduction. RequestError names unknown tasks."""
        entry = task_for(task)
        self.require(entry.name)
        return self.complete(entry.prepare(self, *inputs, **params))

    def complete(self, prepared: Prepared, on_batch: Callable[[int], None] | None = None):
        """A prepared task's result, its runs through ``run`` (``on_batch`` told each batch) in this thread."""
        return prepared.reduce([self.run(run.items, run.output, run.modality, on_batch) for run in prepared.runs])

    def embed(self, inputs: Inputs, *, dimensions: int | None = None, normalize: bool | None = None, **tokenize) -> np.ndarray:
        """(n, dimensions) float32 sentence embeddings (texts, or token ids)."""
        return self.perform("embed", inputs, dimensions=dimensions, normalize=normalize, **tokenize)

    def embed_tokenized(self, items: list[Tokenized], plan: OutputPlan, on_batch=None) -> np.ndarray:
        """Sentence embeddings of already tokenized inputs, by ``plan``, in input order."""
        return self.complete(embed_items(self, items, plan), on_batch)

    def load_images(self, images) -> list[Pixels]:
        """Images (PIL images, bytes, paths, data URIs) -> preprocessed pixels, decoded in parallel on a bounded
        pool of threads; RequestError names the first input that fails, and nothing else is affected."""
        return self.encoder("image").load(images)

    def embed_images(self, images, *, dimensions: int | None = None, normalize: bool | None = None) -> np.ndarray:
        """(n, dimensions) float32 image embeddings, in the same space as ``embed(texts)`` (two-tower artifacts).

        ``images``: one or a list of PIL images, encoded bytes, file paths or ``data:image/...;base64`` URIs.
        The next batch decodes while this one runs; no more than two batches of pixels are held at once (the
        table's ``embed_images`` decodes all first: the batcher needs every input before it can plan).
        """
        images_in = self.encoder("image")
        if hasattr(images_in, "model_inputs"):  # a vision-language encoder: its own prompts around each image
            return self.perform("embed_images", images, dimensions=dimensions, normalize=normalize)
        plan = self.plan_output(dimensions, normalize, modality="image")
        sources = as_image_list(images)
        step = self.options.max_batch_size
        rows: list[np.ndarray] = []
        pending = images_in.decode(sources[:step], 0)
        try:
            for start in range(0, len(sources), step):
                current, following = pending, start + step
                pending = images_in.decode(sources[following:following + step], following) \
                    if following < len(sources) else []
                (out,) = self.run_batch(images_in.collect(current), [plan.output], "image")
                rows.extend(out)
        finally:
            for f in pending:
                f.cancel()
        return finish(np.stack(rows), plan)

    def encode(self, inputs: Inputs, *, pooling_task: str = "embed", **kwargs) -> np.ndarray | list[np.ndarray]:
        """``embed`` (pooling_task="embed") or per-token states (``token_embed``)."""
        if pooling_task not in ("embed", "token_embed"):
            raise RequestError(f"pooling_task '{pooling_task}' is not one of: embed, token_embed", param="pooling_task")
        return self.perform(pooling_task, inputs, **kwargs)

    @property
    def token_output(self) -> str:
        """The graph output ``token_embed`` reads (the encoder's token states; BGE-M3's ColBERT vectors)."""
        self.require("token_embed")
        return self.head.token_output or "token_embeddings"

    def token_states(self, states: np.ndarray, length: int) -> np.ndarray:
        """One input's per-token vectors out of its padded row, less the leading positions the head drops
        (BGE-M3's ColBERT: the CLS token, as FlagEmbedding returns them)."""
        return self.unpad(states, length)[self.head.token_offset:]

    def unpad(self, states: np.ndarray, length: int) -> np.ndarray:
        # (seq, hidden) padded to its batch -> (length, hidden)
        return states[:length] if self.padding == PaddingSide.RIGHT else states[states.shape[0] - length:]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *, use_activation: bool | None = None,
              truncate_prompt_tokens: int | None = None, **kwargs) -> np.ndarray:
        """Scores of queries against documents, vLLM's pairing (1-1, 1-N, N-N): a cross-encoder's pair scores
        (its activation applied unless ``use_activation`` is False), or an embedding model's cosines (texts, or
        for two-tower artifacts images on either side; ``use_activation`` does not apply and is refused)."""
        return self.perform("score", text_1, text_2, use_activation=use_activation,
                            truncate_prompt_tokens=truncate_prompt_tokens, **kwargs)

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None, return_documents: bool = False,
               **kwargs) -> list[dict]:
        """Documents best first: ``{"index", "relevance_score"[, "document"]}`` (cross-encoder scores, or cosines
        for an embedding artifact)."""
        return self.perform("rerank", query, documents, top_n=top_n, return_documents=return_documents, **kwargs)

    def classify(self, inputs: Inputs, *, use_activation: bool = True, **tokenize) -> np.ndarray:
        """(n, labels) per-label probabilities (the model's activation; raw logits with ``use_activation=False``)
        of texts, or of (text, text) pairs given as two-string tuples in the list; column j is ``labels[j]``
        (vLLM's classify task)."""
        return self.perform("classify", inputs, use_activation=use_activation, **tokenize)

    def predict(self, inputs: Inputs, *, raw_scores: bool = False, top_k: int | None = None,
                **tokenize) -> list[list[dict]]:
        """Labels and their probabilities per input, best first: ``[{"label", "score"}, ...]`` (every label, or the
        first ``top_k``), as TEI's /predict and transformers' text-classification pipeline give them; raw logits
        with ``raw_scores``."""
        from toolkit.runtime.tasks import labelled

        return labelled(self, self.classify(inputs, use_activation=not raw_scores, **tokenize), top_k)

    @property
    def labels(self) -> list[str]:
        """The label of each classify column (the config's id2label; ``LABEL_i`` for artifacts that predate it)."""
        if self.card.labels:
            return list(self.card.labels)
        return [f"LABEL_{i}" for i in range(self.manifest.embedding_dim)] if "classify" in self.tasks else []

    def embed_sparse(self, inputs: Inputs, **tokenize) -> list[tuple[np.ndarray, np.ndarray]]:
        """SPLADE: (token indices int64, weights float32) of the non-zero entries per input."""
        return self.perform("embed_sparse", inputs, **tokenize)

    def sparse_tokenized(self, items: list[Tokenized], on_batch=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``embed_sparse`` of already tokenized inputs."""
        return self.complete(sparse_items(items), on_batch)

    def render_chat(self, messages: Sequence[dict], *, chat_template: str | None = None, add_generation_prompt: bool = False,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
        """One conversation -> its prompt text, with the artifact's chat template (or ``chat_template``).

        Embed the result with ``add_special_tokens=False``: the template writes the special tokens itself.
        """
        from toolkit.runtime.chat import render_chat

        return render_chat(chat_template or self.manifest.chat_template, messages,
                           special_tokens=self.manifest.special_tokens, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs,
                           model=self.card.name)

    def tokenize(self, text: str, *, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self.tokenize_inputs([text], add_special_tokens=add_special_tokens, **kwargs)[0].ids

    def detokenize(self, ids: Sequence[int]) -> str:
        self.tokenizer.from_ids(ids, truncate=-1)
        return self.tokenizer.decode(ids)

    def count_tokens(self, inputs: Inputs, **kwargs) -> int:
        return sum(len(t) for t in self.tokenize_inputs(inputs, truncate_prompt_tokens=-1, **kwargs))
