"""Tokenization from the artifact's own ``tokenizer.json`` (the ``tokenizers`` library).

Truncation follows Hugging Face: special tokens are kept, the content is cut
on the side the caller asks for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from toolkit.cards import PaddingSide
from toolkit.errors import ConfigError, InputTooLongError, RequestError

__all__ = ["Tokenized", "Tokenizer", "longest_first", "pad_batch", "window"]

_CHARS_PER_TOKEN = 8  # a first window of 8 characters per token holds the limit for ordinary text
INLINE_CHARS = 4096  # tokenizing this much costs less than a thread hop (~0.25 ms, measured)
_WORD_END = re.compile(r"\S(?=\s)")  # the last character of a word followed by whitespace
_WORD_START = re.compile(r"\s(?=\S)")  # the whitespace right before a word


def window(text: str, chars: int, side: str) -> str:
    """At most ~``chars`` characters of ``text`` from the side that truncation keeps, cut at a word boundary.

    Right: the prefix ending at the last word end inside the first ``chars`` characters.
    Left: the suffix starting at the whitespace before the first word inside the last ``chars``.
    Pre-tokenizers split at whitespace (WordPiece, byte-level BPE, Metaspace), so the window's tokens
    are the text's own first (or last) tokens. A text with no whitespace in the window is cut at the
    character: its token at the cut may differ from the full text's.
    """
    if len(text) <= chars:
        return text
    if side == "right":
        head = text[:chars]
        ends = [m.end() for m in _WORD_END.finditer(head, chars // 2)]  # the cut stays in the window's second half
        return head[: ends[-1]] if ends else head
    tail = text[len(text) - chars:]
    first = _WORD_START.search(tail, 0, chars // 2)
    return tail[first.start():] if first is not None else tail


def longest_first(n1: int, n2: int, max_length: int) -> tuple[int, int]:
    """The lengths the ``longest_first`` rule of Hugging Face's tokenizers keeps of a pair (content tokens)."""
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > max_length else max(n1, max_length - n1)
    if n1 + n2 > max_length:
        n1 = max_length // 2
        n2 = n1 + max_length % 2
    return (n2, n1) if swap else (n1, n2)


class Tokenized:
    """One input's token ids (and type ids), before padding.

    ``parts``: an input longer than the model's window, in chunked mode: its chunks, each a window-sized
    input with its own special tokens (``ids`` then holds all of them, back to back, for counting).
    ``mask``: its attention mask where some of its own positions are not attended (a ColBERT query's [MASK]
    expansion); None: every token is.
    """

    __slots__ = ("ids", "mask", "parts", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int] | None = None, parts: list[Tokenized] | None = None,
                 mask: list[int] | None = None) -> None:
        self.ids = ids
        self.type_ids = type_ids
        self.parts = parts
        self.mask = mask

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
        max_embed_len: int | None = None,
    ) -> list[Tokenized]:
        """Tokenize ``texts``, one tokenization pass each, with work bounded by what the model can use.

        ``truncate``: None raises InputTooLongError past ``max_length``; -1 cuts to
        ``max_length``; k > 0 keeps at most k tokens (specials included). A text far
        longer than the limit is tokenized only over a window of it (see ``window``),
        so a 10 MB text costs what a few thousand characters cost.
        ``max_embed_len`` (chunked mode, with ``truncate`` None): a text of up to that many
        tokens is cut into window-sized chunks (``Tokenized.parts``) instead of refused.
        """
        limit = self._limit(truncate)
        specials = self._n_special if add_special_tokens else 0
        content = max(limit - specials, 1)
        chunked = truncate is None and max_embed_len is not None and max_embed_len > limit
        encodings = self._encode_windows(texts, max_embed_len if chunked else content, side)
        out: list[Tokenized] = []
        for i, (enc, cut) in enumerate(encodings):
            if len(enc.ids) > content:
                if truncate is None and chunked and not cut and len(enc.ids) <= max_embed_len:
                    out.append(self._chunks(enc, content, add_special_tokens))
                    continue
                if truncate is None:
                    most = max_embed_len if chunked else self.max_length
                    raise InputTooLongError(too_long(most, len(enc.ids) + specials, cut, f"input {i}",
                                                     "the chunked-processing maximum" if chunked else ""))
                enc.truncate(content, direction=side)
            if add_special_tokens:
                enc = self._tok.post_process(enc, add_special_tokens=True)
            out.append(Tokenized(enc.ids, enc.type_ids))
        return out

    def encode_pairs(self, firsts: Sequence[str], seconds: Sequence[str], *, truncate: int | None = None,
                     second_limit: int | None = None) -> list[Tokenized]:
        """(query, document) pairs as one sequence each, with the pair's special tokens and type ids.

        Over-long pairs are cut as Hugging Face's fast tokenizers cut them (``longest_first``: the longer side
        first, then both to half); ``truncate`` None raises InputTooLongError instead. Each side is tokenized
        over a bounded window, so a huge document costs what the model can use (except where both sides are
        longer than half the budget: which is longer then decides the odd token, so both are read in full).
        ``second_limit``: the document side is first cut to this many tokens (vLLM's ``max_tokens_per_doc``).
        """
        limit = self._limit(truncate)
        content = max(limit - self._tok.num_special_tokens_to_add(True), 2)
        lefts = self._encode_windows(firsts, content, "right")
        rights = self._encode_windows(seconds, content, "right")
        out = []
        for i, ((a, cut_a), (b, cut_b)) in enumerate(zip(lefts, rights)):
            if (cut_a or cut_b) and content % 2 and min(len(a.ids), len(b.ids)) > content // 2:
                # both sides get cut to halves and the longer one gets the odd token: a window hides which
                # side is longer, so this pair is tokenized in full (bounded by the payload limit)
                a, b = self._encode_many([firsts[i], seconds[i]])
            if second_limit is not None and len(b.ids) > second_limit:
                b.truncate(second_limit)
                cut_b = False
            if len(a.ids) + len(b.ids) > content:
                if truncate is None:
                    specials = self._tok.num_special_tokens_to_add(True)
                    raise InputTooLongError(too_long(self.max_length, len(a.ids) + len(b.ids) + specials,
                                                     cut_a or cut_b, f"pair {i}"))
                n1, n2 = longest_first(len(a.ids), len(b.ids), content)
                a.truncate(n1)
                b.truncate(n2)
            enc = self._tok.post_process(a, b, add_special_tokens=True)
            out.append(Tokenized(enc.ids, enc.type_ids))
        return out

    def _chunks(self, enc: Encoding, content: int, add_special_tokens: bool) -> Tokenized:
        """Window-sized chunks of one long input, each with its own special tokens."""
        enc.truncate(content)  # the rest becomes enc.overflowing, in order
        if add_special_tokens:
            enc = self._tok.post_process(enc, add_special_tokens=True)
        parts = [Tokenized(e.ids, e.type_ids) for e in (enc, *enc.overflowing)]
        return Tokenized([t for p in parts for t in p.ids], None, parts)

    def _encode_windows(self, texts: Sequence[str], content: int, side: str) -> list[tuple[Encoding, bool]]:
        """Each text's content tokens (no specials), over a window big enough to hold ``content`` + 1 tokens.

        The window starts at ``(content + 8) * 8`` characters and doubles while a cut window
        yields too few tokens (whitespace-heavy text), up to the whole text. Returns
        (encoding, whether the text was cut).
        """
        chars = [(content + 8) * _CHARS_PER_TOKEN] * len(texts)
        pending = list(range(len(texts)))
        done: list[tuple[Encoding, bool] | None] = [None] * len(texts)
        while pending:
            windows = [window(texts[i], chars[i], side) for i in pending]
            encodings = self._encode_many(windows)
            retry = []
            for i, win, enc in zip(pending, windows, encodings):
                cut = len(win) < len(texts[i])
                if cut and len(enc.ids) <= content:
                    chars[i] *= 2
                    retry.append(i)
                else:
                    done[i] = (enc, cut)
            pending = retry
        return done  # type: ignore[return-value]

    def _encode_many(self, texts: list[str]) -> list[Encoding]:
        # encode_batch releases the GIL (the event loop keeps running); for one short text
        # its thread pool costs more than the text takes
        if len(texts) == 1 and len(texts[0]) <= INLINE_CHARS:
            return [self._tok.encode(texts[0], add_special_tokens=False)]
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def from_ids(self, ids: Sequence[int], *, truncate: int | None = None, side: str = "right",
                 index: int | None = None) -> Tokenized:
        """Validate a caller's token ids: integers, non-empty, inside the vocabulary, within the limit.

        ``index``: the input's position in the request's list, so that a message points at ``input[index][j]``.
        """
        if len(ids) == 0:
            raise RequestError("a token-id input is empty" if index is None else f"input[{index}] is an empty list "
                               "(a nested list is token ids)", param="input")
        for j, token in enumerate(ids):
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool):
                where = f"input[{index}][{j}]" if index is not None else f"position {j} of a token-id input"
                raise RequestError(f"a nested list must be token ids (integers); got {_json_kind(token)} at {where}",
                                   param="input")
            if not 0 <= token < self.vocab_size:
                where = f" (input[{index}][{j}])" if index is not None else ""
                raise RequestError(f"token id {token}{where} is outside the vocabulary [0, {self.vocab_size})",
                                   param="input")
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
        if truncate > self.max_length:  # as vLLM: an error, not a silent clamp
            raise RequestError(f"truncate_prompt_tokens value ({truncate}) is greater than max_model_len "
                               f"({self.max_length}). Please request a smaller truncation size. (-1 cuts to the "
                               "maximum.)",
                               param="truncate_prompt_tokens")
        return truncate

    def ids(self, text: str, add_special_tokens: bool = True, limit: int | None = None) -> list[int]:
        """All token ids of ``text``, not truncated; RequestError past ``limit`` tokens (the work stops there)."""
        if limit is None:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        ((enc, cut),) = self._encode_windows([text], limit, "right")
        if len(enc.ids) > limit:
            raise RequestError(f"the prompt has more than {limit} tokens, this server's limit per request "
                               "(--max-request-tokens)", param="prompt")
        return self._tok.post_process(enc, add_special_tokens=True).ids if add_special_tokens else enc.ids

    def spans(self, text: str, add_special_tokens: bool = True, limit: int | None = None) -> list[dict]:
        """TEI's ``/tokenize`` answer for one text: ``{"id", "text", "special", "start", "stop"}`` per token, the
        offsets in UTF-8 bytes of ``text`` (as TEI's Rust tokenizer gives them), a special token's ``text`` its
        vocabulary string and its offsets null. RequestError past ``limit`` tokens, found before the full pass."""
        if limit is not None:
            self.ids(text, add_special_tokens, limit)
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        at = [0]
        for ch in text:
            at.append(at[-1] + len(ch.encode("utf-8", "surrogatepass")))
        return [{"id": i, "text": token, "special": True, "start": None, "stop": None} if special else
                {"id": i, "text": text[a:b], "special": False, "start": at[a], "stop": at[b]}
                for i, token, special, (a, b) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (None when it has none)."""
        return self._tok.token_to_id(token)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]


def too_long(maximum: int, count: int, partial: bool, where: str, what: str = "") -> str:
    """OpenAI's and vLLM's context-length sentence (clients such as LiteLLM map a context-window error by it),
    naming the input and the fix. ``partial``: only a window of the text was tokenized, so it has more."""
    requested = f"more than {count}" if partial else str(count)
    limit = f" ({what} of {maximum})" if what else ""
    return (f"This model's maximum context length is {maximum} tokens{limit}. However, you requested {requested} "
            f"tokens in the input for embedding generation ({where}). Please reduce the length of the input prompt, "
            "or set truncate_prompt_tokens (-1: cut to the maximum).")


def _json_kind(value: object) -> str:
    """What a JSON value is, for a message: ``a string ('a')``, ``a number (1.5)``, ``a list``..."""
    match value:
        case bool():
            return f"a boolean ({str(value).lower()})"
        case str():
            return f"a string ({value[:40]!r})"
        case float():
            return f"a number ({value!r})"
        case None:
            return "null"
        case list() | tuple():
            return "a list"
        case dict():
            return "an object"
        case _:
            return type(value).__name__


def pad_batch(
    items: Sequence[Tokenized], *, pad_id: int, side: PaddingSide, type_ids: bool, length: int | None = None
) -> dict[str, np.ndarray]:
    """Pad to the batch's own longest input (or to ``length``, for models trained on fixed-length text):
    int64 (batch, seq) arrays."""
    seq = max(max(len(t) for t in items), length or 0)
    ids = np.full((len(items), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), seq), dtype=np.int64)
    types = np.zeros((len(items), seq), dtype=np.int64) if type_ids else None
    for row, item in enumerate(items):
        n = len(item)
        cols = slice(0, n) if side == PaddingSide.RIGHT else slice(seq - n, seq)
        ids[row, cols] = item.ids
        mask[row, cols] = 1 if item.mask is None else item.mask
        if types is not None and item.type_ids is not None:
            types[row, cols] = item.type_ids
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out
