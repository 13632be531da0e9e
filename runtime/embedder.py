"""The embedded engine: ``Embedder`` with offline embed / encode / score (vLLM-style)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np

from toolkit.errors import ConfigError, RequestError
from toolkit.manifest import ImagePreprocess
from toolkit.runtime.artifact import adapter_path, open_artifact
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.context import ModelContext
from toolkit.runtime.encoders import open_encoders
from toolkit.runtime.images import Pixels, as_image_list
from toolkit.runtime.late_interaction import max_sim
from toolkit.runtime.outputs import OutputPlan, finish, matryoshka_card, plan_output
from toolkit.runtime.pooling import Inputs
from toolkit.runtime.session import LoadedAdapter
from toolkit.runtime.tasks import Prepared, embed_items, labelled, require, sparse_items, task_for
from toolkit.runtime.tokenization import Tokenized, Tokenizer
from toolkit.settings import Device, RuntimeOptions, parse_device, split_named

__all__ = ["OWN_ADAPTER", "Embedder", "Inputs", "open_context"]


class _OwnAdapter:
    """The default of the engine methods' ``adapter``: the Embedder's own (``Embedder(adapter=...)``); None is the
    base model."""

    def __repr__(self) -> str:
        return "OWN_ADAPTER"


OWN_ADAPTER = _OwnAdapter()


class Embedder:
    """Runs one artifact's tasks (embed, score, rerank, classify, token and sparse embeddings; images for two-tower
    artifacts) in the caller's thread, through the task table (``toolkit.runtime.tasks``).

    >>> emb = Embedder("all-MiniLM-L6-v2.onnx")
    >>> emb.embed(["a", "b"]).shape
    (2, 384)
    """

    def __init__(self, artifact: str | os.PathLike, *, device: str | Device | None = None, options: RuntimeOptions | None = None,
                 adapter: str | None = None, **overrides) -> None:
        """Open ``artifact``: an artifact file, or a card name / Hub id / model directory exported before into
        ``TOOLKIT_CACHE`` (``toolkit.export.ensure_artifact`` exports one: ``Embedder(ensure_artifact(MODEL))``).

        ``device`` overrides ``options.device`` when given (default: ``options.device``, itself "auto"); one that
        is not a :class:`Device` name is a ConfigError naming those. ``adapter``: the LoRA adapter every call uses
        unless it names another (``adapter=`` per call; None: the base model); ``adapters`` (the artifact's and
        ``options.adapters``) lists them.
        """
        base = options or RuntimeOptions()
        if device is not None:
            overrides["device"] = parse_device(device)
        self.context = open_context(artifact, msgspec.structs.replace(base, **overrides))
        self._check_defaults()
        try:
            self.context.adapter(adapter)
        except RequestError as exc:  # a bad name at open time is the caller's configuration
            raise ConfigError(exc.message) from None
        self.adapter = adapter

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

    # ---------------------------------------------------------------- the context's facts
    options = property(lambda self: self.context.options, doc="The runtime options it was opened with.")
    path = property(lambda self: self.context.path, doc="The artifact file.")
    session = property(lambda self: self.context.session, doc="The text graph's onnxruntime session.")
    manifest = property(lambda self: self.context.manifest, doc="The artifact's manifest.")
    model_card = property(lambda self: self.context.model_card, doc="The model card (README) the export wrote.")
    card = property(lambda self: self.context.card,
                    doc="The model's card, with the options' Matryoshka switch applied.")
    tokenizer = property(lambda self: self.context.tokenizer, doc="The artifact's tokenizer.")
    encoders = property(lambda self: self.context.encoders, doc="The encoder of each modality it reads.")
    padding = property(lambda self: self.context.padding, doc="The side the card pads on.")
    head = property(lambda self: self.context.head, doc="What this artifact is and the tasks it answers.")
    kind = property(lambda self: self.context.kind, doc="What this artifact is, in words.")
    tasks = property(lambda self: self.context.tasks, doc="The task table's entries this artifact answers.")
    modalities = property(lambda self: self.context.modalities, doc="The modalities it reads (one encoder each).")
    device = property(lambda self: self.context.device, doc="The device its session runs on.")
    dimensions = property(lambda self: self.context.dimensions, doc="Its embedding size.")
    cross_encoder = property(lambda self: self.context.cross_encoder,
                             doc="A reranker: it scores (query, document) pairs instead of embedding texts.")
    labels = property(lambda self: self.context.labels, doc="The label of each classify column.")
    token_output = property(lambda self: self.context.token_output, doc="The graph output token_embed reads.")
    adapters = property(lambda self: self.context.adapters, doc="Its LoRA adapters by name (``adapter=`` picks one).")

    def encoder(self, modality: str):
        """This artifact's encoder for ``modality``; RequestError naming the ones it has."""
        return self.context.encoder(modality)

    @property
    def image_spec(self) -> ImagePreprocess:
        """How images are preprocessed for the image tower (RequestError when this artifact has none)."""
        return self.encoder("image").spec

    def prompt_text(self, prompt_name: str | None, prompt: str | None) -> str:
        """The prompt a text gets (``ModelContext.prompt_text``)."""
        return self.context.prompt_text(prompt_name, prompt)

    def tokenize_inputs(self, inputs: Inputs, **kwargs) -> list[Tokenized]:
        """Inputs in any accepted form -> validated token sequences (``ModelContext.tokenize_inputs``)."""
        return self.context.tokenize_inputs(inputs, **kwargs)

    def truncation(self, truncate_prompt_tokens: int | bool | None) -> int | None:
        """A call's truncation as the tokenizer takes it (``ModelContext.truncation``)."""
        return self.context.truncation(truncate_prompt_tokens)

    # ---------------------------------------------------------------- engine
    def run_batch(self, items: Sequence[Tokenized] | Sequence[Pixels], outputs: Sequence[str],
                  modality: str = "text", adapter: str | None | _OwnAdapter = OWN_ADAPTER) -> list[np.ndarray]:
        """One batch of ``modality``'s model inputs through its graph (with LoRA ``adapter`` active: by default
        this Embedder's, None: the base): (batch, ...) arrays in ``outputs`` order."""
        chosen = self.adapter if adapter is OWN_ADAPTER else adapter
        return self.encoder(modality).run(items, outputs, self.context.adapter(chosen))

    def run(self, items: Sequence[Tokenized] | Sequence[Pixels], output: str, modality: str = "text",
            on_batch: Callable[[int], None] | None = None,
            adapter: str | None | _OwnAdapter = OWN_ADAPTER) -> list[np.ndarray]:
        """Length-sorted token-budget batches of ``modality``'s model inputs (``on_batch(n)`` told each batch of n
        done); one array per input, in input order."""
        results: list[np.ndarray | None] = [None] * len(items)
        batches = plan_batches([len(t) for t in items], max_batch_tokens=self.options.max_batch_tokens,
                               max_batch_size=self.options.max_batch_size)

        def one(batch: list[int]) -> np.ndarray:
            return self.run_batch([items[i] for i in batch], [output], modality, adapter)[0]

        workers = min(self.options.batch_workers or 1, len(batches))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="toolkit-batch") if workers > 1 else None
        try:  # with batch_workers > 1, that many batches at once (onnxruntime runs them without the GIL)
            outs = pool.map(one, batches) if pool is not None else map(one, batches)
            for batch, out in zip(batches, outs):
                for row, index in enumerate(batch):
                    results[index] = out[row]
                if on_batch is not None:
                    on_batch(len(batch))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- outputs
    @property
    def text_classifier(self) -> bool:
        """It labels inputs and scores no pairs (a model with several labels; a one-label cross-encoder scores)."""
        return "classify" in self.tasks and "score" not in self.tasks

    def require(self, task: str) -> None:
        """RequestError naming what this artifact answers when it does not answer ``task`` (a task of the table
        that builds on another, as rerank on score, applies where that one does)."""
        require(self.context, task)

    def plan_output(self, dimensions: int | None, normalize: bool | None, *, modality: str = "text") -> OutputPlan:
        """The graph output (of ``modality``'s encoder) for (dimensions, normalize): ``toolkit.runtime.outputs``."""
        return plan_output(self.context, dimensions, normalize, modality)

    def quantize(self, vectors: np.ndarray, kind: str) -> np.ndarray:
        """Cohere's int8 / uint8 / binary / ubinary of unit ``vectors``, over the range calibrated at export."""
        from toolkit.runtime.encoding import quantize

        return quantize(vectors, kind, tuple(self.manifest.quantization_range or (-1.0, 1.0)), self.dimensions)

    # ---------------------------------------------------------------- public API
    def perform(self, task: str, *inputs, **params):
        """Run the task table's ``task`` (``toolkit.runtime.tasks``) on ``inputs`` in this thread: its checks and
        preparation, its runs one after the other, its reduction. RequestError names unknown tasks. ``adapter=``
        (every task takes it): the LoRA adapter for this call instead of the Embedder's (None: the base)."""
        entry = task_for(task)
        require(self.context, entry.name)
        adapter = self.context.task_adapter(params, self.adapter, takes_prompt=entry.takes_prompt)
        self.context.adapter(adapter)  # an unknown name fails before any work
        return self.complete(entry.prepare(self.context, *inputs, **params), adapter=adapter)

    def complete(self, prepared: Prepared, on_batch: Callable[[int], None] | None = None, *,
                 adapter: str | None | _OwnAdapter = OWN_ADAPTER):
        """A prepared task's result, its runs through ``run`` (``on_batch`` told each batch; ``adapter`` active)
        in this thread."""
        return prepared.reduce([self.run(run.items, run.output, run.modality, on_batch, adapter)
                                for run in prepared.runs])

    def embed(self, inputs: Inputs, *, dimensions: int | None = None, normalize: bool | None = None, **tokenize) -> np.ndarray:
        """(n, dimensions) float32 sentence embeddings (texts, or token ids)."""
        return self.perform("embed", inputs, dimensions=dimensions, normalize=normalize, **tokenize)

    def embed_tokenized(self, items: list[Tokenized], plan: OutputPlan, on_batch=None) -> np.ndarray:
        """Sentence embeddings of already tokenized inputs, by ``plan``, in input order."""
        return self.complete(embed_items(self.context, items, plan), on_batch)

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
        if images_in.builds_inputs:  # a vision-language encoder: its own prompts around each image
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

    def token_states(self, states: np.ndarray, length: int) -> np.ndarray:
        """One input's per-token vectors out of its padded row (``ModelContext.token_states``)."""
        return self.context.token_states(states, length)

    def unpad(self, states: np.ndarray, length: int) -> np.ndarray:
        """(seq, hidden) padded to its batch -> (length, hidden)."""
        return self.context.unpad(states, length)

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

    def embed_multi(self, texts: str | Sequence[str], *, is_query: bool | None = None, **params) -> list[np.ndarray]:
        """A late-interaction (ColBERT) artifact's vectors: per text a (tokens, dim) float32 matrix in query mode
        (``is_query=True``: the query prompt, [MASK] expansion) or document mode (the default: the document prompt,
        the skiplist's tokens dropped), as sentence-transformers' ``encode_query`` / ``encode_document`` return
        them; ``prompt_name="query"`` / ``"document"`` picks the mode too."""
        return self.perform("token_embed", texts, is_query=is_query, **params)

    def max_sim(self, queries: Sequence[np.ndarray], documents: Sequence[np.ndarray]) -> np.ndarray:
        """(n_queries, n_documents) MaxSim of ``embed_multi`` matrices, as this artifact scores (MeanMaxSim where
        its checkpoint declares it); every document at once, no loop over pairs."""
        late = self.context.late_interaction
        return max_sim(list(queries), list(documents), mean=late is not None and late.similarity == "meanmaxsim")

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
        return labelled(self.context, self.classify(inputs, use_activation=not raw_scores, **tokenize), top_k)

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
        return self.context.render_chat(messages, chat_template=chat_template,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        chat_template_kwargs=chat_template_kwargs)

    def tokenize(self, text: str, *, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self.tokenize_inputs([text], add_special_tokens=add_special_tokens, **kwargs)[0].ids

    def detokenize(self, ids: Sequence[int]) -> str:
        self.tokenizer.from_ids(ids, truncate=-1)
        return self.tokenizer.decode(ids)

    def count_tokens(self, inputs: Inputs, **kwargs) -> int:
        return sum(len(t) for t in self.tokenize_inputs(inputs, truncate_prompt_tokens=-1, **kwargs))


def open_context(artifact: str | os.PathLike, options: RuntimeOptions) -> ModelContext:
    """Open ``artifact`` (``open_artifact``: its file, session, manifest) into a ``ModelContext``: the card with
    the options' Matryoshka switch, the tokenizer, and the encoders its manifest declares."""
    loaded = open_artifact(artifact, options)
    manifest = loaded.manifest
    ctx = ModelContext(path=loaded.path, options=options, manifest=manifest,
                       card=matryoshka_card(manifest.card, options, manifest.embedding_dim),
                       tokenizer=Tokenizer(loaded.tokenizer_json, max_length=manifest.max_seq_len),
                       session=loaded.session, model_card=loaded.model_card)
    ctx.encoders.update(open_encoders(ctx, loaded.path))  # one per modality the manifest declares
    ctx.adapters.update(open_adapters(ctx))
    return ctx


def open_adapters(ctx: ModelContext) -> dict[str, LoadedAdapter]:
    """The artifact's LoRA adapters (its manifest's, beside it), then the options' ``NAME=FILE`` ones; ConfigError
    for a missing or unfit file, or a name given twice."""
    files = {spec.name: adapter_path(ctx.path, spec.name) for spec in ctx.manifest.adapters}
    for text in ctx.options.adapters:
        name, file = split_named(text, "adapter", "FILE (an .onnx_adapter file)")
        if name in files:
            raise ConfigError(f"adapter '{name}' is given twice (the artifact carries one of that name)")
        files[name] = Path(file).expanduser()
    for name, file in files.items():
        if not file.is_file():
            raise ConfigError(f"adapter '{name}': no such file {file}")
    return {name: ctx.session.load_adapter(name, file) for name, file in files.items()}
