"""The quality check of an int8 version against its fp32 parent, on the check set shipped with lmbatch
(workers/models/check_data.py).

- The 64 chat prompts: a causal LM generates greedily from each, fp32 and int8: ``greedy_agreement`` is the share
  of prompts whose texts are identical, ``greedy_prefix_agreement`` the mean share of the fp32 text that the int8
  text repeats before it first differs (greedy text diverges for good at the first flipped near-tie, so the exact
  share alone reads harsher than the models differ).
- The 200 labelled review sentences: causal LMs and encoders classify them zero-shot (workers/engines/classify.py):
  the check reports both accuracies and their change in points, and refuses the version when accuracy drops by more
  than ``MAX_ACCURACY_DROP`` points. A model with a classification head has labels of its own: there the share of
  sentences on which int8 and fp32 predict the same label is what counts, and more than ``MAX_ACCURACY_DROP``
  points of disagreement refuse the version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.engines.classify import classify
from workers.engines.generate import batch_token_budget, generate
from workers.engines.params import ClassifyParams, GenerateParams, parse_item
from workers.engines.types import EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.check_data import SENTIMENT_LABELS, check_prompts, check_sentences
from workers.models.loading import LoadedModel

# More than this many points lost (zero-shot accuracy, or agreement with a classification head) refuse a version.
MAX_ACCURACY_DROP = 2.0


class QualityCheckFailed(PermanentJobError):
    """The int8 model lost more than the check allows against its parent: the version is not registered."""

    code = "quality_check_failed"


@dataclass(frozen=True)
class CheckSize:
    prompts: int = 64
    sentences: int = 200
    new_tokens: int = 32


@dataclass(frozen=True)
class Batching:
    """How the check batches its engine calls: a worker's own settings."""

    batch_size: int = 32
    generate_batch_tokens: int = 16384


def quality_check(
    parent: LoadedModel,
    quantized: LoadedModel,
    size: CheckSize,
    *,
    batching: Batching | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any] | None:
    """The check's figures (see the module docstring); None when ``should_stop`` said yes on the way."""
    batching = batching or Batching()
    figures: dict[str, Any] = {"check": {"prompts": 0, "sentences": size.sentences, "new_tokens": 0}}
    if parent.task == "causal-lm":
        texts = _generated(parent, quantized, size, batching, should_stop)
        if texts is None:
            return None
        figures["check"].update(prompts=texts.pop("prompts_compared"), new_tokens=size.new_tokens)
        figures.update(texts)
    labels = classification_figures(parent, quantized, size.sentences, batching=batching, should_stop=should_stop)
    if labels is None:
        return None
    return {**figures, **labels}


def classification_figures(
    parent: LoadedModel,
    quantized: LoadedModel,
    sentences: int,
    *,
    batching: Batching | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any] | None:
    """Both models on the first ``sentences`` labelled sentences: how often they agree and, zero-shot (no
    classification head), each one's accuracy and the change in points. None when ``should_stop`` said yes."""
    batching = batching or Batching()
    pairs = check_sentences(sentences)
    labels: list[list[str | None]] = []
    for model in (parent, quantized):
        predicted = _classified(model, [text for text, _ in pairs], batching, should_stop)
        if predicted is None:
            return None
        labels.append(predicted)
    fp32, int8 = labels
    agreed = sum(a == b for a, b in zip(fp32, int8, strict=True))
    figures: dict[str, Any] = {"prediction_agreement": _share(agreed, len(pairs))}
    if parent.task != "sequence-classification":
        gold = [label for _, label in pairs]
        before = _share(sum(p == g for p, g in zip(fp32, gold, strict=True)), len(gold))
        after = _share(sum(p == g for p, g in zip(int8, gold, strict=True)), len(gold))
        figures.update(
            zero_shot_accuracy_fp32=before,
            zero_shot_accuracy_int8=after,
            accuracy_change_points=round(100 * (after - before), 2),
        )
    return figures


def text_agreement(fp32: Mapping[int, str], int8: Mapping[int, str]) -> dict[str, Any]:
    """Greedy texts of the same prompts (by item index), fp32 against int8. A prompt one side has no text for (too
    long for the model's context: both fail alike) is left out of ``prompts_compared``."""
    both = sorted(set(fp32) & set(int8))
    same = sum(fp32[i] == int8[i] for i in both)
    prefix = sum(_common_prefix_share(fp32[i], int8[i]) for i in both)
    return {
        "prompts_compared": len(both),
        "greedy_agreement": _share(same, len(both)),
        "greedy_prefix_agreement": round(prefix / len(both), 4) if both else 0.0,
    }


def refusal(figures: dict[str, Any]) -> str | None:
    """Why the check refuses the version, or None when it passes."""
    change = figures.get("accuracy_change_points")
    sentences = figures["check"]["sentences"]
    if change is not None:
        if change < -MAX_ACCURACY_DROP:
            before, after = 100 * figures["zero_shot_accuracy_fp32"], 100 * figures["zero_shot_accuracy_int8"]
            return (
                f"zero-shot accuracy on {sentences} labelled sentences fell from {before:.1f}% (fp32) to "
                f"{after:.1f}% (int8), {-change:.1f} points, more than the {MAX_ACCURACY_DROP:g} allowed"
            )
        return None
    disagreement = round(100 * (1 - figures["prediction_agreement"]), 2)
    if disagreement > MAX_ACCURACY_DROP:
        return (
            f"the int8 model's classification head disagrees with fp32 on {disagreement:.1f}% of {sentences} "
            f"sentences, more than the {MAX_ACCURACY_DROP:g} points allowed"
        )
    return None


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def _generated(
    parent: LoadedModel, quantized: LoadedModel, size: CheckSize, batching: Batching, should_stop: Callable[[], bool]
) -> dict[str, Any] | None:
    items = [
        EngineItem(index=i, custom_id=None, input=parse_item("generate", raw))
        for i, raw in enumerate(check_prompts(size.prompts))
    ]
    params = GenerateParams(max_new_tokens=size.new_tokens, temperature=0.0)
    texts: list[dict[int, str]] = []
    for model in (parent, quantized):
        results = generate(
            model,
            items,
            params,
            batch_size=batching.batch_size,
            max_batch_tokens=batch_token_budget(model, batching.generate_batch_tokens),
            should_stop=should_stop,
        )
        if should_stop():
            return None
        texts.append({r.index: r.output["text"] for r in results if r.output is not None})
    return text_agreement(*texts)


def _common_prefix_share(reference: str, other: str) -> float:
    if not reference:
        return 1.0 if not other else 0.0
    same = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), None)
    return (min(len(reference), len(other)) if same is None else same) / len(reference)


def _classified(
    model: LoadedModel, texts: list[str], batching: Batching, should_stop: Callable[[], bool]
) -> list[str | None] | None:
    items = [EngineItem(index=i, custom_id=None, input={"text": text}) for i, text in enumerate(texts)]
    labels = None if model.task == "sequence-classification" else list(SENTIMENT_LABELS)
    results = classify(
        model, items, ClassifyParams(labels=labels), batch_size=batching.batch_size, should_stop=should_stop
    )
    if should_stop():
        return None
    by_index: dict[int, ItemResult] = {r.index: r for r in results}
    return [(by_index[i].output or {}).get("label") if i in by_index else None for i in range(len(texts))]
