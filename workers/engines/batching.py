"""Length bucketing: group items of similar token length so a padded batch wastes little compute.

Pure Python (no torch), so a benchmark can compare batchings without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence


def bucket_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions into ``lengths``, longest first, cut into batches of at most ``batch_size``.

    Longest first so that a batch too big for the GPU shows up (and is halved) at the start of a shard, not
    after most of it has been computed. The sort is stable: equal lengths keep arrival order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
