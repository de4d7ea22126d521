"""Cutting a job's items into shards: how many items each holds, and which items go together.

How many. A shard has fixed costs (a claim, its transactions, a Celery round trip), so a shard of 64 items that take
10 ms each spends a good part of its time on them, while 64 generations take seconds. With `shard_target_seconds`
set, a job's shards hold that much work by its model's measured seconds per item (db/shard_costs.py, recorded by the
workers after each shard), within bounds (``ShardSizing``); a model and kind that never ran gets `shard_size`.

Which together. A worker length-buckets the items of one shard, but it can only sort what it sees: 64 items of
arrival order still mix short and long texts, and each forward batch pads to its longest (measured: 25% of
computed positions were padding on the cls-e2e reviews). So the items of a window of several shards are
sorted by a length hint first and then cut: each shard holds items of similar length (7% padding).

Sorting within a window, not the whole job, keeps streaming: a 200,000-item file is never held whole.
A sorted item carries its position in the job as ``index``; an item without one (arrival order, or rows
written before sorting existed) is at ``shard.start + its offset``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# Kinds whose items cost about the same from one job to the next (a forward pass over a text), so one job's
# measurement sizes the next job's shards in both directions. A generation item's cost depends on its own
# max_new_tokens and where it stops: an estimate may shrink generation shards (a slow model), never grow them past
# shard_size, so a shard stays short enough to re-run after a lost worker and to leave room to other tenants.
GROWING_KINDS = ("classify", "embed")
# A grown shard's text: at most this many times the estimate's measured characters per item (and never counting an
# item as shorter than MIN_MEASURED_CHARS, so an estimate made on one-character texts still admits real ones).
CHARS_SLACK = 2.0
MIN_MEASURED_CHARS = 16.0


@dataclass(frozen=True)
class ShardSizing:
    """The rules for a job's shard size, from the settings (``Settings.shard_sizing``).

    ``default`` (`shard_size`) is the size without an estimate, and with ``target_seconds`` 0. With an estimate, the
    size is ``target_seconds / seconds_per_item``, at least a forward batch (``batch_size``, or ``default`` if that
    is smaller: a shard smaller than a batch wastes the batching that made the estimate, and would measure each
    item dearer, shrinking the next shards further) and at most ``max_items`` (``default`` for generation).
    """

    default: int
    target_seconds: float
    max_items: int
    batch_size: int
    max_item_chars: int

    def size_for(self, kind: str, seconds_per_item: float | None) -> int:
        if self.target_seconds <= 0 or seconds_per_item is None or seconds_per_item <= 0:
            return self.default
        floor = min(self.default, self.batch_size)
        ceiling = max(self.max_items, self.default) if kind in GROWING_KINDS else self.default
        return max(floor, min(ceiling, int(self.target_seconds / seconds_per_item)))

    def max_chars_for(self, kind: str, size: int, *, chars_per_item: float) -> int:
        """Characters of text per shard of ``size`` items sized from an estimate that measured ``chars_per_item``:
        a shard grown past `shard_size` holds at most ``CHARS_SLACK`` times the measured text per item, so a job of
        longer texts than the estimate's (another tenant's, say) gets proportionally fewer items a shard."""
        if kind not in GROWING_KINDS or size <= self.default:
            return self.max_chars
        measured = max(chars_per_item, MIN_MEASURED_CHARS)
        return max(1, min(self.max_chars, math.ceil(size * measured * CHARS_SLACK)))

    @property
    def max_chars(self) -> int:
        """Characters of text per shard: no more than `shard_size` items at the per-item cap, so a large shard of
        long texts is cut short instead of becoming a row (and a window in memory) larger than ever before."""
        return self.default * self.max_item_chars


@dataclass(frozen=True)
class ShardCut:
    items: list[dict[str, Any]]
    start: int  # the lowest item index in the shard
    end: int  # one past the highest


def cut_shards(
    items: Iterable[dict[str, Any]], *, shard_size: int, sort_window: int, max_chars: int | None = None
) -> Iterator[ShardCut]:
    """Shards of at most ``shard_size`` items and ``max_chars`` characters of text (each shard holds at least one
    item, however long); ``sort_window`` shards' worth sorted by length at a time.

    ``sort_window`` 1 keeps arrival order (and stores no per-item index).
    """
    if shard_size < 1 or sort_window < 1:
        raise ValueError("shard_size and sort_window must be at least 1")
    window_chars = None if max_chars is None else max_chars * sort_window
    first = 0
    for window in _chunks(items, shard_size * sort_window, window_chars):
        if sort_window == 1:
            yield ShardCut(window, first, first + len(window))
        else:
            indexed = [{**item, "index": first + offset} for offset, item in enumerate(window)]
            indexed.sort(key=length_hint)  # stable: equal lengths keep arrival order
            # As many shards as the window needs, of equal size: a job's last window (a partial one) gets no
            # remainder shard of a few items, dearer each and idle workers' only work.
            per_shard = -(-len(window) // -(-len(window) // shard_size))
            for part in _chunks(indexed, per_shard, max_chars):
                indexes = [item["index"] for item in part]
                yield ShardCut(part, min(indexes), max(indexes) + 1)
        first += len(window)


def item_index(item: dict[str, Any], *, shard_start: int, offset: int) -> int:
    """Where a stored shard item sits in its job."""
    index = item.get("index")
    return shard_start + offset if index is None else int(index)


def length_hint(item: dict[str, Any]) -> int:
    """Characters of text in an item's input: a tokenizer-free stand-in for its token count."""
    return text_length(item.get("input"))


def text_length(value: Any) -> int:
    """Characters of text in a JSON value: its strings', at any depth."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_length(v) for v in value.values())
    if isinstance(value, list):
        return sum(text_length(v) for v in value)
    return 0


def _chunks(items: Iterable[dict[str, Any]], size: int, max_chars: int | None) -> Iterator[list[dict[str, Any]]]:
    """Runs of at most ``size`` items and ``max_chars`` characters, read lazily: a run full by count is handed on
    before the next item is read."""
    chunk: list[dict[str, Any]] = []
    chars = 0
    for item in items:
        if max_chars is not None:
            length = length_hint(item)
            if chunk and chars + length > max_chars:
                yield chunk
                chunk, chars = [], 0
            chars += length
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk
