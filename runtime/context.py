"""The model context: one opened artifact as data, which the task table, the outputs, the encoders and the
vision-language code read.

It holds what an export wrote and what opening it produced (path, manifest, card, tokenizer, the text graph's
session, the options, one encoder per modality) and answers questions about them (what the artifact answers, a
call's prompt and truncation, its inputs tokenized). It opens nothing itself and imports no engine: the engines
(``Embedder``, ``AsyncEmbedder``) open a context (``open_context``) and are thin layers over it and the task
table. Everything here reads the manifest; nothing infers a kind from an output name or an object's attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from toolkit.cards import ModelCard, PaddingSide
from toolkit.errors import RequestError
from toolkit.manifest import HeadSpec, LateInteraction, Manifest
from toolkit.runtime.pooling import Inputs, as_input_list
from toolkit.runtime.session import LoadedAdapter, OrtSession
from toolkit.runtime.tokenization import Tokenized, Tokenizer
from toolkit.settings import Device, RuntimeOptions

__all__ = ["Encoder", "ModelContext"]


class Encoder(Protocol):
    """One modality's (or, for a vision-language artifact, every modality's) way into the artifact's graphs.

    ``builds_inputs``: the encoder makes its own model inputs from raw items (``model_inputs(items, **params) ->
    (items, OutputPlan)``: a vision-language encoder renders each item's prompt around its images); otherwise the
    task table prepares them (texts tokenized by the context, images decoded by ``load``)."""

    modality: str
    builds_inputs: ClassVar[bool]

    @staticmethod
    def accepts(item) -> bool:
        """Whether ``item`` is an input of this modality (text, the fallback, takes whatever no other claims)."""

    def run(self, items: Sequence, outputs: Sequence[str], adapter: LoadedAdapter | None = None) -> list[np.ndarray]:
        """(batch, ...) arrays in ``outputs`` order for one batch of this modality's model inputs (``adapter``: the
        LoRA adapter active for the batch; only the text graph has slots for one)."""


@dataclass(eq=False)
class ModelContext:
    """One opened artifact (see the module docstring). ``card`` is the manifest's card with the options'
    Matryoshka switch applied; ``encoders`` maps each modality the manifest declares to its encoder (one encoder
    object may serve several modalities: ``manifest.encoders`` says which)."""

    path: Path
    options: RuntimeOptions
    manifest: Manifest
    card: ModelCard
    tokenizer: Tokenizer
    session: OrtSession
    model_card: str = ""
    encoders: dict[str, Encoder] = field(default_factory=dict)
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)  # LoRA adapters by name (the manifest's first)

    def task_adapter(self, params: dict, default: str | None, *, takes_prompt: bool) -> str | None:
        """The adapter a call runs with, ``params['adapter']`` popped: the one it names, else the engine's
        (``default``), else, where the card maps prompt names to adapters (jina-embeddings-v3's tasks), the one
        its prompt name (or the default prompt name) maps to. An adapter that is some prompt's adapter brings that
        prompt to a call that names none (``takes_prompt``: the task reads ``prompt_name``); a call with its own
        ``prompt`` text keeps what it says."""
        adapter = params.pop("adapter", default)
        mapping = self.card.prompt_adapters
        if not mapping or params.get("prompt") is not None:
            return adapter
        name = params.get("prompt_name")
        if adapter is not None:
            if name is None and takes_prompt:
                prompt = next((p for p, a in mapping.items() if a == adapter), None)
                if prompt is not None:
                    params["prompt_name"] = prompt
            return adapter
        if name is None and self.options.default_prompt is None:
            name = self.options.default_prompt_name or self.card.default_prompt_name
        return mapping.get(name) if name is not None else None

    def adapter(self, name: str | None) -> LoadedAdapter | None:
        """The adapter ``name`` (None: the base model); RequestError naming the adapters there are."""
        if name is None:
            return None
        found = self.adapters.get(name)
        if found is None:
            raise RequestError(f"adapter '{name}' is not one of this model's: "
                               f"{', '.join(self.adapters) or '(it has none)'}", param="adapter")
        return found

    # ---------------------------------------------------------------- what it is
    @property
    def head(self) -> HeadSpec:
        return self.manifest.head_spec

    @property
    def kind(self) -> str:
        return self.head.label

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task table's entries this artifact answers (its manifest's head says which)."""
        return tuple(self.head.tasks)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    @property
    def dimensions(self) -> int:
        return self.manifest.embedding_dim

    @property
    def device(self) -> Device:
        return self.session.device

    @property
    def padding(self) -> PaddingSide:
        return PaddingSide(self.card.padding_side)

    @property
    def cross_encoder(self) -> bool:
        """A reranker artifact: it scores (query, document) pairs instead of embedding texts."""
        return self.head.pairs

    @property
    def late_interaction(self) -> LateInteraction | None:
        """A multi-vector (ColBERT) artifact's modes and scoring, as its manifest declares them; None otherwise."""
        return self.head.late_interaction

    @property
    def labels(self) -> list[str]:
        """The label of each classify column (the config's id2label; ``LABEL_i`` for artifacts that predate it)."""
        if self.card.labels:
            return list(self.card.labels)
        return [f"LABEL_{i}" for i in range(self.dimensions)] if "classify" in self.tasks else []

    def answers(self, task: str) -> None:
        """RequestError naming what the artifact answers when its manifest does not list ``task``."""
        if task not in self.tasks:
            raise RequestError(f"this {self.kind} artifact does not answer '{task}'; it answers: "
                               f"{', '.join(self.tasks)}", param="model")

    def encoder(self, modality: str) -> Encoder:
        """This artifact's encoder for ``modality``; RequestError naming the ones it has."""
        if modality not in self.encoders:
            raise RequestError(f"this {self.kind} artifact reads {', '.join(self.encoders)} only; it has no "
                               f"{modality} encoder" + (" (no image tower)" if modality == "image" else ""),
                               param="input")
        return self.encoders[modality]

    def shares_encoder(self, modalities) -> bool:
        """Whether one encoder reads all of ``modalities`` (as the manifest declares: a vision-language artifact's
        texts, images and items go through the same graphs)."""
        declared = self.manifest.encoders
        return len({declared.get(m, m) for m in modalities}) == 1

    # ---------------------------------------------------------------- token outputs
    @property
    def token_output(self) -> str:
        """The graph output ``token_embed`` reads (the encoder's token states; BGE-M3's ColBERT vectors)."""
        self.answers("token_embed")
        return self.head.token_output or "token_embeddings"

    def token_states(self, states: np.ndarray, length: int) -> np.ndarray:
        """One input's per-token vectors out of its padded row, less the leading positions the head drops
        (BGE-M3's ColBERT: the CLS token, as FlagEmbedding returns them)."""
        return self.unpad(states, length)[self.head.token_offset:]

    def unpad(self, states: np.ndarray, length: int) -> np.ndarray:
        # (seq, hidden) padded to its batch -> (length, hidden)
        return states[:length] if self.padding == PaddingSide.RIGHT else states[states.shape[0] - length:]

    # ---------------------------------------------------------------- inputs
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

    def truncation(self, truncate_prompt_tokens: int | bool | None) -> int | None:
        """A call's truncation as the tokenizer takes it: None (not given) is -1, cut to the window, under
        ``auto_truncate`` and None (too long is an error) otherwise; False (the call refuses truncation) is None."""
        if truncate_prompt_tokens is False:
            return None
        if truncate_prompt_tokens is None and self.options.auto_truncate:
            return -1
        return truncate_prompt_tokens

    def tokenize_inputs(self, inputs: Inputs, *, prompt_name: str | None = None, prompt: str | None = None,
                        truncate_prompt_tokens: int | None = None, truncation_side: str = "right",
                        add_special_tokens: bool = True) -> list[Tokenized]:
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

    def render_chat(self, messages: Sequence[Any], *, chat_template: str | None = None,
                    add_generation_prompt: bool = False, continue_final_message: bool = False,
                    chat_template_kwargs: Mapping[str, Any] | None = None, keep_parts: bool = False) -> str:
        """One conversation -> its prompt text, with the artifact's chat template (or ``chat_template``), the
        caller's flags as given (``keep_parts``: content parts go to the template as they are, images included)."""
        from toolkit.runtime.chat import render_chat

        return render_chat(chat_template or self.manifest.chat_template, messages,
                           special_tokens=self.manifest.special_tokens, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs,
                           model=self.card.name, keep_parts=keep_parts)
