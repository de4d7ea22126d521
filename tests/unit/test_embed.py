"""The embed engine and the mean pooling it shares with classify."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engines.common import mean_pool
from workers.engines.embed import embed
from workers.engines.params import EmbedParams
from workers.engines.types import EngineItem, ItemResult
from workers.models.loading import LoadedModel

TEXTS = ["a short one", "a somewhat longer sentence about nothing in particular", "x", "middle length text"]


def text_items(texts: list[str] = TEXTS) -> list[EngineItem]:
    return [EngineItem(i, f"t{i}", {"text": t}) for i, t in enumerate(texts)]


def vectors(results: list[ItemResult]) -> torch.Tensor:
    return torch.tensor([r.output["embedding"] for r in results if r.output is not None])


def test_given_padding_when_mean_pooling_expect_only_real_positions_averaged() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm"])
def test_given_texts_when_embedded_expect_unit_vectors_of_the_hidden_width(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(model_fixture)
    results = embed(model, text_items(), EmbedParams(), batch_size=2)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.custom_id for r in results] == ["t0", "t1", "t2", "t3"]
    got = vectors(results)
    assert got.shape == (4, model.model.config.hidden_size)
    assert torch.allclose(got.norm(dim=1), torch.ones(4), atol=1e-5)
    assert all(r.prompt_tokens > 0 and r.completion_tokens == 0 for r in results)


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm"])
def test_given_texts_when_embedded_in_batches_or_alone_expect_the_same_vectors(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    # Padding must not leak into the pooled vector, for bidirectional and causal attention alike.
    model: LoadedModel = request.getfixturevalue(model_fixture)
    batched = vectors(embed(model, text_items(), EmbedParams(), batch_size=4))
    alone = vectors(embed(model, text_items(), EmbedParams(), batch_size=1))
    assert torch.allclose(batched, alone, atol=1e-5)


def test_given_normalize_false_when_embedding_expect_raw_mean_pooled_vectors(tiny_encoder: LoadedModel) -> None:
    raw = vectors(embed(tiny_encoder, text_items(), EmbedParams(normalize=False), batch_size=2))
    unit = vectors(embed(tiny_encoder, text_items(), EmbedParams(), batch_size=2))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), unit, atol=1e-5)


def test_given_empty_and_too_long_texts_when_embedding_expect_item_errors_beside_good_results(
    tiny_encoder: LoadedModel,
) -> None:
    items = text_items(["fine", "", "word " * 100, "also fine"])
    results = embed(tiny_encoder, items, EmbedParams(), batch_size=8)
    assert [r.error["code"] if r.error else None for r in results] == [
        None,
        "invalid_item",
        "context_length_exceeded",
        None,
    ]
    assert results[3].output is not None
    assert math.isclose(sum(v * v for v in results[3].output["embedding"]), 1.0, rel_tol=1e-5)


def test_given_should_stop_before_the_first_batch_when_embedding_expect_nothing(tiny_encoder: LoadedModel) -> None:
    assert embed(tiny_encoder, text_items(), EmbedParams(), batch_size=2, should_stop=lambda: True) == []
