"""Length-sorted, token-budget batches: pad each batch only to its own longest input."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plan_batches"]


def plan_batches(lengths: Sequence[int], *, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches.

    Inputs are sorted by length, and a batch grows while its padded size
    (count x longest) stays within ``max_batch_tokens`` and its count within
    ``max_batch_size``. A single input longer than the budget gets its own batch.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # ascending: the newcomer is the longest
        if current and ((len(current) + 1) * longest > max_batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
