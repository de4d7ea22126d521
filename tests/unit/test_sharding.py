"""Cutting items into shards: every item exactly once, under its own index, similar lengths together, as many as
the sizing rules give."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from db.sharding import ShardSizing, cut_shards, item_index, length_hint


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


# --- shard sizes ------------------------------------------------------------------------------------------------

SIZING = ShardSizing(default=64, target_seconds=5.0, max_items=4096, batch_size=32, max_item_chars=1000)


def test_without_an_estimate_or_a_target_a_shard_holds_shard_size_items() -> None:
    assert SIZING.size_for("classify", None) == 64
    assert replace(SIZING, target_seconds=0).size_for("classify", 0.001) == 64


@pytest.mark.parametrize(
    ("kind", "seconds_per_item", "expected"),
    [
        ("classify", 0.01, 500),  # 5 s of work
        ("embed", 0.0001, 4096),  # capped at max_items
        ("classify", 1.0, 32),  # never below a forward batch
        ("generate", 0.01, 64),  # generation never grows past shard_size…
        ("generate", 0.1, 50),  # …but shrinks for a slow model
        ("generate", 2.0, 32),  # down to a batch
    ],
)
def test_an_estimate_sizes_shards_to_the_target_within_bounds(
    kind: str, seconds_per_item: float, expected: int
) -> None:
    assert SIZING.size_for(kind, seconds_per_item) == expected


def test_a_shard_size_below_a_batch_is_kept_and_a_max_below_it_does_not_shrink_it() -> None:
    small = replace(SIZING, default=16)
    assert small.size_for("classify", 10.0) == 16  # the floor is the smaller of a batch and shard_size
    assert replace(SIZING, max_items=10).size_for("classify", 0.0001) == 64


def test_a_long_text_ends_a_shard_before_its_count_does() -> None:
    # Given items of 40, 40, 40, 10 characters and room for 100 characters a shard
    cuts = list(cut_shards(texts([40, 40, 40, 10]), shard_size=10, sort_window=1, max_chars=100))
    # I expect shards cut by characters, in arrival order, each item once
    assert [[i["custom_id"] for i in c.items] for c in cuts] == [["c0", "c1"], ["c2", "c3"]]
    assert [(c.start, c.end) for c in cuts] == [(0, 2), (2, 4)]
    # An item longer than the room still gets a shard of its own; sorted windows keep the same bound.
    assert [len(c.items) for c in cut_shards(texts([500, 1]), shard_size=10, sort_window=1, max_chars=100)] == [1, 1]
    sorted_cuts = list(cut_shards(texts([60, 10, 60, 10, 60]), shard_size=10, sort_window=2, max_chars=100))
    assert sorted(placed(sorted_cuts)) == list(range(5))
    assert all(sum(length_hint(i) for i in c.items) <= 100 for c in sorted_cuts)


def test_a_partial_window_is_cut_into_shards_of_equal_size() -> None:
    # Given 10 items, shards of 4 and windows of 2 shards: a full window of 8, then a window of 2
    assert [len(c.items) for c in cut_shards(texts([1] * 10), shard_size=4, sort_window=2)] == [4, 4, 2]
    # 9 items in one window of 12: three shards of 3, not 4, 4 and 1
    assert [len(c.items) for c in cut_shards(texts([1] * 9), shard_size=4, sort_window=3)] == [3, 3, 3]
