"""Rows to output tables: ``RowEncoder`` embeds a window of (ids, values) with the task table's recipes,
the same in this process and on a Ray actor."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from toolkit.bulk.options import SKIPPED_FILE, BulkError, BulkOptions, require_pyarrow
from toolkit.errors import ConfigError, InputTooLongError, RequestError
from toolkit.runtime.tasks import TASKS

if TYPE_CHECKING:
    import pyarrow as pa

    from toolkit.runtime import Embedder


__all__ = ["Encoded", "RowEncoder"]


class Encoded(msgspec.Struct):
    """One window's result: the output rows (in input order), the rows refused and why, tokens read."""

    table: Any  # pyarrow.Table
    skipped: list[tuple[Any, str]]
    tokens: int


class RowEncoder:
    """Embeds (ids, values) windows into output tables; one per process or Ray actor.

    Rows that cannot be embedded (an empty or missing text, one past the model's
    maximum without ``truncate``, an unreadable image) raise :class:`BulkError`
    naming the row id, or with ``on_error="skip"`` are returned in ``skipped``.
    """

    def __init__(self, embedder: Embedder, options: BulkOptions) -> None:
        pa = require_pyarrow()
        options.validate()
        self.embedder, self.options = embedder, options
        # the artifact's own task: BGE-M3's dense vectors, SPLADE's sparse ones, a classifier's labels
        self.task = options.task or next((t for t in ("embed", "embed_sparse", "classify") if t in embedder.tasks),
                                         "embed")
        self.sparse = self.task == "embed_sparse"
        self.images = options.image_column is not None
        # a vision-language artifact renders its own prompts around texts and images: its rows go through embed()
        self.prompted = hasattr(embedder.encoders.get("text"), "model_inputs")
        if options.paired and not self.prompted:
            raise ConfigError(f"this {embedder.kind} artifact embeds a text or an image per row; a text column with "
                              "--image-column is for vision-language artifacts (their items hold both)")
        entry = TASKS.get(self.task)
        if entry is None or entry.rows is None or entry.modality != "text":
            valid = [name for name, t in TASKS.items() if t.rows is not None and t.modality == "text"]
            raise ConfigError(f"--task '{self.task}' is not one of: {', '.join(valid)}")
        if not entry.applies(embedder.context):
            raise ConfigError(f"this {embedder.kind} artifact does not answer '{self.task}'; it answers: "
                              f"{', '.join(embedder.tasks)}")
        self.generic = self.task not in ("embed", "embed_sparse")
        if self.generic:  # a task of the table with a row per input: its rows as they come
            if options.dimensions is not None or options.embedding_type != "float" or self.images:
                raise ConfigError(f"--task {self.task} writes its rows as float lists; --dimensions, "
                                  "--embedding-type and --image-column do not apply")
            self.plan = None
            self.fields = [pa.field("embedding", pa.list_(pa.float32()))]
            self.width = None
            if self.task == "token_embed":  # a matrix per row: a list of fixed-size vectors, as an index reads them
                width = embedder.session.output_shape(embedder.token_output)[-1]
                if isinstance(width, int):
                    self.width = width
                    self.fields = [pa.field("embedding", pa.list_(pa.list_(pa.float32(), width)))]
            if self.task == "classify":  # the most likely label, and every label's probability in label order
                self.fields = [pa.field("label", pa.string()), pa.field("probabilities", pa.list_(pa.float32()))]
        elif self.sparse:
            if options.dimensions is not None or options.embedding_type != "float":
                raise ConfigError("a sparse (SPLADE) artifact writes (indices, values); --dimensions and "
                                  "--embedding-type do not apply")
            if self.images:
                raise ConfigError("a sparse artifact embeds text only; drop --image-column")
            self.plan = None
            self.fields = [pa.field("indices", pa.list_(pa.int32())), pa.field("values", pa.list_(pa.float32()))]
        else:
            if self.images and "image" not in embedder.modalities:
                raise ConfigError(f"this {embedder.kind} artifact has no image tower; drop --image-column")
            try:
                self.plan = embedder.plan_output(options.dimensions, options.normalize,
                                                  modality="image" if self.images else "text")
            except RequestError as exc:
                raise ConfigError(exc.message) from None
            dims = options.dimensions or embedder.dimensions
            if options.embedding_type in ("int8", "uint8") and not self._unit_vectors():
                raise ConfigError(f"--embedding-type {options.embedding_type} quantizes unit vectors; drop "
                                  "--no-normalize or write float")
            width, kind = {"float": (dims, pa.float32()), "int8": (dims, pa.int8()), "uint8": (dims, pa.uint8()),
                           "binary": ((dims + 7) // 8, pa.int8()),
                           "ubinary": ((dims + 7) // 8, pa.uint8())}[options.embedding_type]
            self.width = width
            self.fields = [pa.field("embedding", pa.list_(kind, width))]

    def _unit_vectors(self) -> bool:
        return self.embedder.card.normalize if self.options.normalize is None else self.options.normalize

    def schema(self, id_type: pa.DataType) -> pa.Schema:
        pa = require_pyarrow()
        return pa.schema([pa.field(self.options.id_name, id_type), *self.fields])

    # ------------------------------------------------------------ per window
    def __call__(self, ids: pa.Array, values: Sequence, on_batch: Callable[[int], None] | None = None) -> Encoded:
        """The window's :class:`Encoded`; ``on_batch(rows)`` is told as the model's batches complete."""
        pa = require_pyarrow()
        bad: dict[int, str] = {}
        for i, value in enumerate(values):
            if self.options.paired:  # (image, text): the image is required, the text may be missing
                image, text = value
                if image is None:
                    bad[i] = f"no {self.options.value_column!r} value"
                elif text is not None and not isinstance(text, str):
                    bad[i] = f"{self.options.text_column!r} is not a string ({type(text).__name__})"
            elif value is None:
                bad[i] = f"no {self.options.value_column!r} value"
            elif not self.images and not isinstance(value, str):
                bad[i] = f"{self.options.value_column!r} is not a string ({type(value).__name__})"
            elif not self.images and not value.strip():
                bad[i] = "empty text"
        good = [i for i in range(len(values)) if i not in bad]
        rows, tokens = self._embed([values[i] for i in good], good, bad, on_batch) if good else ([], 0)
        good = [i for i in good if i not in bad]
        if bad and self.options.on_error == "stop":
            first = min(bad)
            raise BulkError(f"row {self.options.id_name}={ids[first].as_py()!r}: {bad[first]}; --on-error skip "
                            f"records such rows in {SKIPPED_FILE} and goes on")
        columns = [ids.take(pa.array(good, pa.int64())) if bad else ids, *self._columns(rows)]
        table = pa.Table.from_arrays(columns, schema=self.schema(ids.type))
        return Encoded(table, [(ids[i].as_py(), bad[i]) for i in sorted(bad)], tokens)

    def _embed(self, values: list, index: list[int], bad: dict[int, str],
               on_batch: Callable[[int], None] | None) -> tuple[np.ndarray | list, int]:
        """(vectors, or SPLADE's (indices, weights) per row; tokens read) of ``values`` (rows ``index`` of the
        window), in order; rows found bad on the way go into ``bad`` and are left out."""
        if self.prompted and not self.generic:
            return self._embed_prompted(values, index, bad, on_batch)
        if self.images:
            return self._embed_images(values, index, bad), 0
        if self.generic:
            return self._embed_task(values, index, bad, on_batch)
        items = self._tokenize(values, index, bad)
        if not items:
            return [], 0
        tokens = sum(len(t) for t in items)
        if self.sparse:
            return self.embedder.sparse_tokenized(items, on_batch), tokens
        return self.embedder.embed_tokenized(items, self.plan, on_batch), tokens

    def _tokenize(self, texts: list[str], index: list[int], bad: dict[int, str]) -> list:
        """Tokenized texts; one call for the window, row by row only when some row is refused."""
        kwargs = self._tokenize_options()
        try:
            return self.embedder.tokenize_inputs(texts, **kwargs)
        except RequestError:
            pass
        items = []
        for text, row in zip(texts, index):
            try:
                items.extend(self.embedder.tokenize_inputs([text], **kwargs))
            except InputTooLongError:
                bad[row] = (f"longer than the model's maximum of {self.embedder.tokenizer.max_length} tokens; "
                            "--truncate cuts such texts")
            except RequestError as exc:
                bad[row] = exc.message
        return items

    def _embed_task(self, values: list, index: list[int], bad: dict[int, str], on_batch) -> tuple[list, int]:
        """Rows of ``--task``'s entry for the window: prepared in one call, and only when some row is refused
        tokenized row by row to find which (the others are then prepared again)."""
        entry, options = TASKS[self.task], self._tokenize_options()
        try:
            prepared = entry.prepare(self.embedder.context, values, **options)
        except RequestError:
            self._tokenize(values, index, bad)
            values = [value for value, row in zip(values, index) if row not in bad]
            if not values:
                return [], 0
            prepared = entry.prepare(self.embedder.context, values, **options)
        return entry.rows(self.embedder.context, self.embedder.complete(prepared, on_batch)), prepared.tokens

    def _tokenize_options(self) -> dict:
        return {"prompt_name": self.options.prompt_name, "truncate_prompt_tokens": -1 if self.options.truncate else None}

    def _embed_prompted(self, values: list, index: list[int], bad: dict[int, str],
                        on_batch) -> tuple[np.ndarray | list, int]:
        """A vision-language artifact's rows (texts, images, or (image, text) pairs as one item each) through
        ``embed``, which renders the model's prompt; the window in one call, row by row only when some row is
        refused (those go into ``bad``)."""
        from toolkit.runtime.vision_language import Multimodal

        items = [Multimodal(v[1] or None, [v[0]]) if self.options.paired else
                 Multimodal(images=[v]) if self.images else v for v in values]
        params = {"dimensions": self.options.dimensions, "normalize": self.options.normalize,
                  "prompt_name": self.options.prompt_name}
        embed = TASKS["embed"]
        try:
            prepared = embed.prepare(self.embedder.context, items, **params)
            return self.embedder.complete(prepared, on_batch), prepared.tokens
        except RequestError:
            pass
        rows, tokens = [], 0
        for item, row in zip(items, index):
            try:
                prepared = embed.prepare(self.embedder.context, [item], **params)
                rows.append(self.embedder.complete(prepared)[0])
                tokens += prepared.tokens
            except RequestError as exc:
                bad[row] = exc.message.removeprefix("input[0]: ").removeprefix("image 0: ")
        return (np.stack(rows) if rows else []), tokens

    def _embed_images(self, images: list, index: list[int], bad: dict[int, str]) -> np.ndarray | list:
        """Image vectors; the window in one call, image by image only when some image cannot be read (each is then
        decoded to find which; the others are embedded)."""
        embed = functools.partial(self.embedder.embed_images, dimensions=self.options.dimensions,
                                  normalize=self.options.normalize)
        try:
            return embed(images)
        except RequestError:
            pass
        keep = []
        for image, row in zip(images, index):
            try:
                self.embedder.load_images([image])
                keep.append(image)
            except RequestError as exc:
                bad[row] = exc.message.removeprefix("image 0: ")
        return embed(keep) if keep else []

    def _columns(self, rows: np.ndarray | list) -> list:
        """The output columns after the id: ``embedding`` (as ``--embedding-type``), or SPLADE's indices and values."""
        pa = require_pyarrow()
        if len(rows) == 0:
            return [pa.array([], field.type) for field in self.fields]
        if self.sparse:
            return self._sparse_columns(rows)
        if self.task == "classify":
            labels = self.embedder.labels
            return [pa.array([labels[int(np.argmax(r))] for r in rows], pa.string()),
                    _list_column([np.asarray(r, np.float32) for r in rows], pa.float32())]
        if self.generic and self.width is not None:  # token_embed: each row's (tokens, width) matrix
            return [_list_column([np.asarray(r, np.float32).reshape(-1, self.width) for r in rows], pa.float32(),
                                 self.width)]
        if self.generic:
            return [_list_column([np.asarray(r, np.float32).reshape(-1) for r in rows], pa.float32())]
        match self.options.embedding_type:
            case "float":
                flat = np.ascontiguousarray(rows, np.float32)
            case kind:
                flat = self.embedder.quantize(rows, kind)
        return [pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.width)]

    def _sparse_columns(self, entries: list[tuple[np.ndarray, np.ndarray]]) -> list:
        pa = require_pyarrow()
        return [_list_column([i.astype(np.int32) for i, _ in entries], pa.int32()),
                _list_column([v.astype(np.float32) for _, v in entries], pa.float32())]


def _list_column(rows: list[np.ndarray], kind, width: int | None = None) -> Any:
    """A pyarrow list column of arrays of varying length: 1-D, or with ``width`` (rows, width) matrices as lists of
    fixed-size lists."""
    pa = require_pyarrow()
    offsets = np.zeros(len(rows) + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    values = pa.array(np.concatenate(rows).reshape(-1), kind)
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


