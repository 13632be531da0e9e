"""Tokenization from the artifact's own ``tokenizer.json`` (the ``tokenizers`` library).

Truncation follows Hugging Face: special tokens are kept, the content is cut
on the side the caller asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from toolkit.cards import PaddingSide
from toolkit.errors import ConfigError, InputTooLongError, RequestError

__all__ = ["Tokenized", "Tokenizer", "pad_batch"]


class Tokenized:
    """One input's token ids (and type ids), before padding."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int] | None = None) -> None:
        self.ids = ids
        self.type_ids = type_ids

    def __len__(self) -> int:
        return len(self.ids)


class Tokenizer:
    """A thread-safe wrapper: no padding or truncation state lives on the tokenizer."""

    def __init__(self, tokenizer_json: str, *, max_length: int) -> None:
        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library's one boundary
            raise ConfigError(f"invalid tokenizer.json: {exc}") from None
        self._tok.no_padding()  # some tokenizer.json files carry these baked in
        self._tok.no_truncation()
        self.max_length = max_length
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._n_special = self._tok.num_special_tokens_to_add(False)

    def encode(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        truncate: int | None = None,
        side: str = "right",
    ) -> list[Tokenized]:
        """Tokenize ``texts``.

        ``truncate``: None raises InputTooLongError past ``max_length``; -1 cuts to
        ``max_length``; k > 0 keeps at most k tokens (specials included).
        """
        limit = self._limit(truncate)
        if len(texts) == 1:  # encode_batch's thread pool costs more than one text takes
            encodings = [self._tok.encode(texts[0], add_special_tokens=add_special_tokens)]
        else:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        out: list[Tokenized] = []
        for i, enc in enumerate(encodings):
            if len(enc.ids) > limit:
                if truncate is None:
                    raise InputTooLongError(
                        f"input {i} has {len(enc.ids)} tokens, more than the model's maximum of "
                        f"{self.max_length}; shorten it or set truncate_prompt_tokens"
                    )
                enc = self._truncate(texts[i], limit, side, add_special_tokens)
            out.append(Tokenized(enc.ids, enc.type_ids))
        return out

    def from_ids(self, ids: Sequence[int], *, truncate: int | None = None, side: str = "right") -> Tokenized:
        """Validate a caller's token ids: non-empty, inside the vocabulary, within the limit."""
        if len(ids) == 0:
            raise RequestError("a token-id input is empty", param="input")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})", param="input")
        limit = self._limit(truncate)
        if len(ids) > limit:
            if truncate is None:
                raise InputTooLongError(
                    f"a token-id input has {len(ids)} tokens, more than the model's maximum of {self.max_length}"
                )
            ids = ids[:limit] if side == "right" else ids[len(ids) - limit:]
        return Tokenized(list(ids), None)

    def _limit(self, truncate: int | None) -> int:
        if truncate is None or truncate == -1:
            return self.max_length
        if truncate < 1:
            raise RequestError(f"truncate_prompt_tokens must be -1 or >= 1, got {truncate}", param="truncate_prompt_tokens")
        return min(truncate, self.max_length)

    def _truncate(self, text: str, limit: int, side: str, add_special_tokens: bool) -> Encoding:
        enc = self._tok.encode(text, add_special_tokens=False)
        specials = self._n_special if add_special_tokens else 0
        enc.truncate(max(limit - specials, 1), direction=side)
        if add_special_tokens:
            enc = self._tok.post_process(enc, add_special_tokens=True)
        return enc

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """All token ids of ``text``, with no length limit."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]


def pad_batch(
    items: Sequence[Tokenized], *, pad_id: int, side: PaddingSide, type_ids: bool
) -> dict[str, np.ndarray]:
    """Pad to the batch's own longest input: int64 (batch, seq) arrays."""
    seq = max(len(t) for t in items)
    ids = np.full((len(items), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), seq), dtype=np.int64)
    types = np.zeros((len(items), seq), dtype=np.int64) if type_ids else None
    for row, item in enumerate(items):
        n = len(item)
        cols = slice(0, n) if side == PaddingSide.RIGHT else slice(seq - n, seq)
        ids[row, cols] = item.ids
        mask[row, cols] = 1
        if types is not None and item.type_ids is not None:
            types[row, cols] = item.type_ids
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out
