"""Cutting items into shards: every item exactly once, under its own index, similar lengths together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from db.sharding import cut_shards, item_index, length_hint


def texts(lengths: list[int]) -> list[dict[str, Any]]:
    return [{"custom_id": f"c{i}", "input": {"text": "x" * n}} for i, n in enumerate(lengths)]


def placed(cuts: list[Any]) -> dict[int, dict[str, Any]]:
    """Each item by the index a worker would give it."""
    return {
        item_index(item, shard_start=cut.start, offset=offset): item
        for cut in cuts
        for offset, item in enumerate(cut.items)
    }


def test_a_window_of_one_keeps_arrival_order_and_contiguous_ranges() -> None:
    cuts = list(cut_shards(texts([5, 1, 9, 3, 7]), shard_size=2, sort_window=1))
    assert [(c.start, c.end, [i["custom_id"] for i in c.items]) for c in cuts] == [
        (0, 2, ["c0", "c1"]),
        (2, 4, ["c2", "c3"]),
        (4, 5, ["c4"]),
    ]
    assert all("index" not in item for cut in cuts for item in cut.items)


def test_sorted_shards_hold_similar_lengths_and_every_item_once_under_its_index() -> None:
    lengths = [50, 1, 49, 2, 48, 3, 47, 4, 10, 90]
    cuts = list(cut_shards(texts(lengths), shard_size=2, sort_window=4))
    by_index = placed(cuts)
    # Every item exactly once, each under its arrival position.
    assert sorted(by_index) == list(range(len(lengths)))
    assert all(by_index[i]["custom_id"] == f"c{i}" for i in by_index)
    # Within the first window (8 items), shards pair the shortest with the shortest.
    assert [sorted(length_hint(item) for item in cut.items) for cut in cuts[:4]] == [[1, 2], [3, 4], [47, 48], [49, 50]]
    # start/end bound the indexes each shard holds; the last window is sorted on its own.
    assert all(cut.start <= item["index"] < cut.end for cut in cuts for item in cut.items)
    assert len(cuts) == 5 and sorted(item["index"] for item in cuts[-1].items) == [8, 9]


def test_items_are_read_one_window_at_a_time() -> None:
    consumed = 0

    def stream() -> Iterator[dict[str, Any]]:
        nonlocal consumed
        for item in texts([3] * 100):
            consumed += 1
            yield item

    cuts = cut_shards(stream(), shard_size=5, sort_window=2)
    next(cuts)
    assert consumed == 10


def test_chat_messages_count_their_text() -> None:
    chat = {"input": {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}}
    assert length_hint(chat) == len("user") + len("hello") + len("assistant") + len("hi")


@pytest.mark.parametrize(("shard_size", "sort_window"), [(0, 1), (1, 0)])
def test_sizes_below_one_are_refused(shard_size: int, sort_window: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(cut_shards(texts([1]), shard_size=shard_size, sort_window=sort_window))
