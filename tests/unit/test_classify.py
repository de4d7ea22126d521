"""The classify engine in its three modes: a classification head, encoder zero-shot, causal-LM zero-shot."""

from __future__ import annotations

import pytest

from workers.engines.classify import classify
from workers.engines.params import ClassifyParams
from workers.engines.types import EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel

TEXTS = ["I loved it", "Terrible, would not buy again", "It arrived on a Tuesday", "ok"]
LABELS = ["positive", "negative", "neutral"]


def text_items(texts: list[str] = TEXTS) -> list[EngineItem]:
    return [EngineItem(i, f"t{i}", {"text": t}) for i, t in enumerate(texts)]


def check_distribution(result: ItemResult, labels: list[str]) -> None:
    assert result.error is None and result.output is not None
    scores = result.output["scores"]
    assert set(scores) == set(labels)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    assert (result.output["label"], result.output["score"]) == next(iter(scores.items()))


def test_given_a_classification_head_when_classifying_expect_its_id2label_classes(tiny_classifier: LoadedModel) -> None:
    results = classify(tiny_classifier, text_items(), ClassifyParams(), batch_size=3)
    assert [r.index for r in results] == [0, 1, 2, 3]
    for result in results:
        check_distribution(result, ["negative", "neutral", "positive"])


def test_given_labels_for_a_classification_head_when_classifying_expect_only_those_classes(
    tiny_classifier: LoadedModel,
) -> None:
    results = classify(tiny_classifier, text_items(), ClassifyParams(labels=["positive", "negative"]), batch_size=3)
    for result in results:
        check_distribution(result, ["positive", "negative"])
    with pytest.raises(PermanentJobError, match="not among"):
        classify(tiny_classifier, text_items(), ClassifyParams(labels=["happy", "sad"]), batch_size=3)


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm"])
def test_given_zero_shot_labels_when_classifying_expect_a_distribution_over_them(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(model_fixture)
    results = classify(model, text_items(), ClassifyParams(labels=LABELS), batch_size=6)
    assert [r.custom_id for r in results] == ["t0", "t1", "t2", "t3"]
    for result in results:
        check_distribution(result, LABELS)


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm", "tiny_classifier"])
def test_given_texts_when_classified_in_batches_or_alone_expect_the_same_scores(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(model_fixture)
    params = ClassifyParams(labels=None if model.task == "sequence-classification" else LABELS)
    batched = classify(model, text_items(), params, batch_size=12)
    alone = classify(model, text_items(), params, batch_size=1)
    for one, other in zip(batched, alone, strict=True):
        assert one.output is not None and other.output is not None
        assert one.output["label"] == other.output["label"]
        assert one.output["scores"] == pytest.approx(other.output["scores"], abs=1e-4)


def test_given_top_k_when_classifying_expect_only_the_k_best_scores(tiny_encoder: LoadedModel) -> None:
    [full] = classify(tiny_encoder, text_items()[:1], ClassifyParams(labels=LABELS), batch_size=1)
    [top] = classify(tiny_encoder, text_items()[:1], ClassifyParams(labels=LABELS, top_k=2), batch_size=1)
    assert full.output is not None and top.output is not None
    assert top.output["scores"] == dict(list(full.output["scores"].items())[:2])
    assert top.output["label"] == full.output["label"]


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm"])
def test_given_zero_shot_without_labels_when_classifying_expect_a_permanent_error(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(PermanentJobError, match="labels"):
        classify(request.getfixturevalue(model_fixture), text_items(), ClassifyParams(), batch_size=2)


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_lm", "tiny_classifier"])
def test_given_empty_and_too_long_texts_when_classifying_expect_item_errors_beside_good_results(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(model_fixture)
    params = ClassifyParams(labels=None if model.task == "sequence-classification" else LABELS)
    results = classify(model, text_items(["good", "", "word " * 200, "fine"]), params, batch_size=4)
    assert [r.error["code"] if r.error else None for r in results] == [
        None,
        "invalid_item",
        "context_length_exceeded",
        None,
    ]


def test_given_should_stop_after_one_batch_when_classifying_expect_that_batch_only(tiny_encoder: LoadedModel) -> None:
    seen: list[list[ItemResult]] = []
    results = classify(
        tiny_encoder,
        text_items(),
        ClassifyParams(labels=LABELS),
        batch_size=3,
        should_stop=lambda: bool(seen),
        on_batch=seen.append,
    )
    assert len(results) == 3 == len(seen[0]) and len(seen) == 1
