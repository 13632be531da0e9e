from __future__ import annotations

import os
import subprocess
import sys

import pytest

from toolkit.cards import ModelCard, Pooling, find_card, list_cards, load_card
from toolkit.errors import ConfigError

NAMED = ["all-MiniLM-L6-v2", "bge-small-en-v1.5", "bge-base-en-v1.5", "bge-large-en-v1.5", "e5-small-v2", "e5-base-v2",
         "multilingual-e5-small", "multilingual-e5-base", "gte-base", "gte-modernbert-base", "snowflake-arctic-embed-xs",
         "snowflake-arctic-embed-m-v1.5", "nomic-embed-text-v1.5", "Qwen3-Embedding-0.6B", "embeddinggemma-300m",
         "bge-m3", "splade-v3", "jina-embeddings-v3", "ms-marco-MiniLM-L6-v2", "bge-reranker-base", "bge-reranker-large",
         "bge-reranker-v2-m3", "gte-reranker-modernbert-base", "text2vec-base-chinese-sentence", "bge-multilingual-gemma2",
         "llama-nemotron-embed-1b-v2", "GritLM-7B", "e5-mistral-7b-instruct", "gte-Qwen2-7B-instruct",
         "gte-multilingual-base", "snowflake-arctic-embed-m-v2.0"]


@pytest.mark.parametrize("name", sorted(list_cards()))
def test_every_card_decodes_and_is_consistent(name):
    card = load_card(name)
    assert isinstance(card, ModelCard) and card.name == name
    assert card.source
    if card.late_interaction:  # per-token vectors: no pooling; the checkpoint declares its lengths
        assert card.pooling is None
    else:
        assert card.pooling is not None and card.max_seq_len
    assert all(d > 0 for d in card.matryoshka_dims)
    if card.default_prompt_name:
        assert card.default_prompt_name in card.prompts
    if card.pooling in (Pooling.SPLADE, Pooling.RANK):
        assert not card.normalize


def test_the_seeded_cards_exist():
    assert set(NAMED) <= set(list_cards())


def test_cards_decode_strictly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\npooling = "mean"\npoolling = "cls"\n')
    with pytest.raises(ConfigError, match="poolling"):
        load_card(bad)
    bad.write_text('name = "x"\npooling = "average"\n')
    with pytest.raises(ConfigError, match="pooling"):
        load_card(bad)


def test_find_card_by_hub_id():
    assert find_card("BAAI/bge-small-en-v1.5").pooling == Pooling.CLS
    assert find_card("nobody/nothing") is None


def _cards_table(columns: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "cards"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_cards_table_fits_the_terminal_width():
    headers = ["card", "source", "pooling", "normalize", "max", "prompts", "matryoshka", "offline"]
    lines = _cards_table("80")
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == headers  # every header whole, `offline` included
    # long names fold over lines, whole: a row starts where its pooling is written
    source_at, pooling_at, normalize_at = (lines[0].index(h) for h in ("source", "pooling", "normalize"))
    names: list[str] = []
    for line in lines[2:]:
        if line[pooling_at:normalize_at].strip():
            names.append("")
        names[-1] += line[:source_at].strip()
    assert names == list(list_cards())
    # piped without COLUMNS: full width, a card a line
    wide = _cards_table(None)
    assert wide[0].split() == headers and len(wide) == len(list_cards()) + 2
    assert any(line.startswith("snowflake-arctic-embed-m-v1.5 ") for line in wide)
