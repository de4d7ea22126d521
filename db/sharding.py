"""Cutting a job's items into shards, with items of similar length kept together.

A worker length-buckets the items of one shard, but it can only sort what it sees: 64 items of arrival
order still mix short and long texts, and each forward batch pads to its longest (measured: 25% of
computed positions were padding on the cls-e2e reviews). So the items of a window of several shards are
sorted by a length hint first and then cut: each shard holds items of similar length (7% padding).

Sorting within a window, not the whole job, keeps streaming: a 200,000-item file is never held whole.
A sorted item carries its position in the job as ``index``; an item without one (arrival order, or rows
written before sorting existed) is at ``shard.start + its offset``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShardCut:
    items: list[dict[str, Any]]
    start: int  # the lowest item index in the shard
    end: int  # one past the highest


def cut_shards(items: Iterable[dict[str, Any]], *, shard_size: int, sort_window: int) -> Iterator[ShardCut]:
    """Shards of at most ``shard_size`` items; ``sort_window`` shards' worth sorted by length at a time.

    ``sort_window`` 1 keeps arrival order (and stores no per-item index).
    """
    if shard_size < 1 or sort_window < 1:
        raise ValueError("shard_size and sort_window must be at least 1")
    first = 0
    for window in _chunks(items, shard_size * sort_window):
        if sort_window == 1:
            yield ShardCut(window, first, first + len(window))
        else:
            indexed = [{**item, "index": first + offset} for offset, item in enumerate(window)]
            indexed.sort(key=length_hint)  # stable: equal lengths keep arrival order
            for start in range(0, len(indexed), shard_size):
                part = indexed[start : start + shard_size]
                indexes = [item["index"] for item in part]
                yield ShardCut(part, min(indexes), max(indexes) + 1)
        first += len(window)


def item_index(item: dict[str, Any], *, shard_start: int, offset: int) -> int:
    """Where a stored shard item sits in its job."""
    index = item.get("index")
    return shard_start + offset if index is None else int(index)


def length_hint(item: dict[str, Any]) -> int:
    """Characters of text in an item's input: a tokenizer-free stand-in for its token count."""
    return _text_length(item.get("input"))


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    return 0


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
