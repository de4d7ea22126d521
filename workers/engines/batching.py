"""Length bucketing: group items of similar token length so a padded batch wastes little compute.

Pure Python (no torch), so a benchmark can compare batchings without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence


def bucket_by_length(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, *, extra_tokens: int = 0
) -> list[list[int]]:
    """Positions into ``lengths``, longest first, cut into batches of at most ``batch_size``.

    Longest first so that a batch too big for the GPU shows up (and is halved) at the start of a shard, not
    after most of it has been computed. The sort is stable: equal lengths keep arrival order. With
    ``max_tokens``, a batch also closes before its padded size, items x (its longest + ``extra_tokens``, the
    tokens each row will grow by), would pass that budget, so long items go in smaller batches (a single item
    over the budget still gets a batch).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_tokens is None:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for position in order:
        current = batches[-1] if batches else None
        # The batch's first item is its longest: the width every row is padded to.
        width = lengths[current[0]] + extra_tokens if current else 0
        if current is None or len(current) == batch_size or (len(current) + 1) * width > max_tokens:
            batches.append([position])
        else:
            current.append(position)
    return batches


def arrival_batches(count: int, batch_size: int) -> list[list[int]]:
    """Positions ``0..count-1`` in arrival order, cut into batches: the baseline bucketing is measured against."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of computed positions that are padding: each batch computes ``len(batch) * its longest`` positions."""
    computed = sum(len(batch) * max((lengths[i] for i in batch), default=0) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 0.0 if computed == 0 else (computed - real) / computed
