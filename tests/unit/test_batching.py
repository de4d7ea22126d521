"""Length bucketing and the padding it saves."""

from __future__ import annotations

import random

import pytest

from workers.engines.batching import arrival_batches, bucket_by_length, padding_fraction


def test_given_mixed_lengths_when_bucketed_expect_longest_first_and_every_item_once() -> None:
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = bucket_by_length(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert batches[0][:2] == [2, 4]  # equal lengths keep arrival order


def test_given_no_items_when_bucketed_expect_no_batches_and_zero_padding() -> None:
    assert bucket_by_length([], 4) == []
    assert padding_fraction([], []) == 0.0


def test_given_a_batch_size_below_one_when_bucketing_expect_value_error() -> None:
    with pytest.raises(ValueError):
        bucket_by_length([1, 2], 0)
    with pytest.raises(ValueError):
        arrival_batches(2, 0)


def test_given_known_batches_when_measuring_padding_expect_exact_fraction() -> None:
    # Batch [4, 2]: 8 positions computed, 6 real -> 2 padding. Batch [1]: no padding. 2 of 9.
    assert padding_fraction([4, 2, 1], [[0, 1], [2]]) == pytest.approx(2 / 9)


def test_given_varied_lengths_when_bucketed_expect_far_less_padding_than_arrival_order() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(256)]
    bucketed = padding_fraction(lengths, bucket_by_length(lengths, 16))
    arrival = padding_fraction(lengths, arrival_batches(len(lengths), 16))
    assert bucketed < 0.1 < 0.3 < arrival


def test_given_a_token_budget_when_bucketing_expect_long_items_in_smaller_batches() -> None:
    lengths = [100, 10, 100, 10, 100, 10, 10, 10, 300]
    # Budget 240 with 20 new tokens per row: one 300 alone (over budget, still a batch), two 100s (2 x 120),
    # then the last 100 with one 10, and the remaining 10s up to the batch size of 4 (4 x 30 = 120).
    batches = bucket_by_length(lengths, 4, 240, extra_tokens=20)
    assert [[lengths[i] for i in b] for b in batches] == [[300], [100, 100], [100, 10], [10, 10, 10, 10]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # Without a budget the same items fill batches by count alone.
    assert [len(b) for b in bucket_by_length(lengths, 4)] == [4, 4, 1]
