"""Bulk embedding's options, names and errors (``toolkit embed``, ``BulkOptions``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from toolkit.errors import ConfigError, ToolkitError
from toolkit.model_source import install_hint

if TYPE_CHECKING:

    pass


__all__ = ["BulkError", "BulkOptions", "EMBEDDING_TYPES", "FORMATS", "ON_ERROR", "PROGRESS_FILE", "ROW_NUMBER", "SKIPPED_FILE", "require_pyarrow"]


FORMATS = ("parquet", "jsonl", "csv", "text")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".csv": "csv", ".txt": "text", ".text": "text"}
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
ON_ERROR = ("stop", "skip")
PROGRESS_FILE = "_progress.json"
SKIPPED_FILE = "_skipped.jsonl"  # "_" first: Parquet dataset readers skip it
ROW_NUMBER = "row"  # the id column's name when the input names none


class BulkError(ToolkitError):
    """A row that cannot be embedded (with ``on_error="stop"``) or an output that cannot be resumed."""


class BulkOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What to embed and how; the same fields as the HTTP APIs where they overlap."""

    text_column: str = "text"
    image_column: str | None = None  # two-tower artifacts: a column of image paths or encoded bytes
    # vision-language artifacts, with image_column: each row's image and this column's text are ONE item
    with_text: bool = False
    id_column: str | None = None  # kept in the output; without one, the row number (0-based, across files)
    input_format: str | None = None  # parquet | jsonl | csv | text; default: from the file extension
    dimensions: int | None = None
    prompt_name: str | None = None
    normalize: bool | None = None
    embedding_type: str = "float"
    truncate: bool = False  # cut over-long texts to the model's maximum instead of refusing them
    on_error: str = "stop"
    rows_per_part: int = 50_000
    window: int = 2048  # rows tokenized and length-sorted together
    # the task table's entry to run (toolkit.runtime.tasks): None is "embed", "embed_sparse" for a sparse (SPLADE)
    # artifact, "classify" for a classifier (columns `label` and `probabilities`); any other text task with a row
    # per input writes its rows as a list column `embedding`
    task: str | None = None
    adapter: str | None = None  # the artifact's LoRA adapter every row runs with (None: the base model)

    def validate(self) -> None:
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ConfigError(f"--embedding-type '{self.embedding_type}' is not one of: {', '.join(EMBEDDING_TYPES)}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error '{self.on_error}' is not one of: {', '.join(ON_ERROR)}")
        if self.with_text and self.image_column is None:
            raise ConfigError("a text column alongside images needs --image-column")
        if self.input_format is not None and self.input_format not in FORMATS:
            raise ConfigError(f"--input-format '{self.input_format}' is not one of: {', '.join(FORMATS)}")
        if self.rows_per_part < 1 or self.window < 1:
            raise ConfigError("--rows-per-part and --window must be at least 1")

    @property
    def id_name(self) -> str:
        return self.id_column or ROW_NUMBER

    @property
    def value_column(self) -> str:
        return self.image_column or self.text_column

    @property
    def value_columns(self) -> list[str]:
        """The columns a row's value is read from: one, or (image, text) for items that hold both."""
        return [self.value_column, self.text_column] if self.paired else [self.value_column]

    @property
    def paired(self) -> bool:
        return self.with_text and self.image_column is not None

    def row_values(self, columns: list[list]) -> list:
        """A window's values from its ``value_columns`` (lists): the one column's, or (image, text) pairs."""
        return list(zip(*columns)) if self.paired else columns[0]


def require_pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(f"bulk embedding needs pyarrow, the [bulk] extra: {install_hint('bulk')}") from None
    return pyarrow


