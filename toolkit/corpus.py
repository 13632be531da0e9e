"""The bundled probe / benchmark corpus: toolkit/data/corpus.jsonl (5005 texts with ids)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["corpus_path", "load_corpus"]


def corpus_path() -> Path:
    return Path(str(resources.files("toolkit") / "data" / "corpus.jsonl"))


def load_corpus(path: str | Path | None = None, *, limit: int | None = None) -> list[str]:
    """Texts of a JSON-lines corpus with a ``text`` field per line."""
    texts: list[str] = []
    with open(path or corpus_path(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                texts.append(json.loads(line)["text"])
                if limit is not None and len(texts) >= limit:
                    break
    return texts
