"""Text classification, by the loaded model's task.

- ``sequence-classification``: the model's own head; labels from ``config.id2label``.
- ``encoder`` (zero-shot): cosine similarity between the text's embedding and each label put through
  ``params.template``, scaled and softmaxed.
- ``causal-lm`` (zero-shot): mean log-probability of each label as the continuation of a short prompt, softmaxed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from workers.engines.common import Prepared, encode_sequences, pad_batch, pad_id, run_batches, tokenize_texts
from workers.engines.types import EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel

if TYPE_CHECKING:
    # Annotations only: the engines run without pydantic (benchmarks' --engines-only, on a bare GPU host).
    from workers.engines.params import ClassifyParams

# Cosine similarities of sentence embeddings differ by a few hundredths between labels; softmax over them raw
# would give near-uniform scores. CLIP multiplies by ~100 for the same reason.
ZERO_SHOT_SCALE = 100.0


def classify(
    model: LoadedModel,
    items: Sequence[EngineItem],
    params: ClassifyParams,
    *,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[list[ItemResult]], None] | None = None,
) -> list[ItemResult]:
    """One ``{"label", "score", "scores": {label: p}}`` per item, scores sorted best first.

    In causal-LM mode ``batch_size`` counts (text, label) sequences per forward pass, so a batch holds
    ``batch_size // len(labels)`` texts (at least one).
    """
    if model.task != "sequence-classification" and not params.labels:
        raise PermanentJobError(f"zero-shot classification with a {model.task} model needs 'labels' in params")
    scorer: Callable[[list[Prepared]], tuple[list[str], torch.Tensor]]
    if model.task == "sequence-classification":
        prepared, rejected = tokenize_texts(model, items)
        scorer = _head_scorer(model, params.labels)
    elif model.task == "encoder":
        assert params.labels is not None
        prepared, rejected = tokenize_texts(model, items)
        scorer = _similarity_scorer(model, params.labels, params.template)
    else:
        assert params.labels is not None
        labels = params.labels
        label_ids = [
            list(ids)
            for ids in model.tokenizer([" " + label for label in labels], add_special_tokens=False)["input_ids"]
        ]
        render = _prompt_renderer(labels)
        prepared, rejected = tokenize_texts(model, items, render=render, extra_tokens=max(map(len, label_ids)))
        scorer = _likelihood_scorer(model, labels, label_ids)
        batch_size = max(1, batch_size // len(labels))

    def run_batch(batch: list[Prepared]) -> list[ItemResult]:
        with torch.inference_mode():
            labels, probs = scorer(batch)
        return [
            ItemResult(item.index, item.custom_id, _output(labels, row, params.top_k), None, prompt_tokens=len(ids))
            for (item, ids), row in zip(batch, probs.tolist(), strict=True)
        ]

    return run_batches(prepared, rejected, run_batch, batch_size=batch_size, should_stop=should_stop, on_batch=on_batch)


def _output(labels: list[str], probs: list[float], top_k: int | None) -> dict[str, Any]:
    ranked = sorted(zip(labels, probs, strict=True), key=lambda pair: -pair[1])[: top_k or len(labels)]
    return {"label": ranked[0][0], "score": ranked[0][1], "scores": dict(ranked)}


def _head_scorer(
    model: LoadedModel, wanted: list[str] | None
) -> Callable[[list[Prepared]], tuple[list[str], torch.Tensor]]:
    id2label = model.model.config.id2label
    all_labels = [str(id2label[i]) for i in range(len(id2label))]
    if wanted:
        unknown = [label for label in wanted if label not in all_labels]
        if unknown:
            raise PermanentJobError(f"labels {unknown} are not among this model's labels {all_labels}")
    # Given labels restrict the softmax to those classes; otherwise all of the model's classes compete.
    columns = [all_labels.index(label) for label in wanted] if wanted else list(range(len(all_labels)))
    labels = [all_labels[c] for c in columns]

    def score(batch: list[Prepared]) -> tuple[list[str], torch.Tensor]:
        input_ids, mask = pad_batch([ids for _, ids in batch], pad_id(model.tokenizer), left=False, device=model.device)
        logits = model.model(input_ids=input_ids, attention_mask=mask).logits.float()
        return labels, logits[:, columns].softmax(dim=-1).cpu()

    return score


def _similarity_scorer(
    model: LoadedModel, labels: list[str], template: str
) -> Callable[[list[Prepared]], tuple[list[str], torch.Tensor]]:
    hypotheses = model.tokenizer([template.format(label) for label in labels], add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        label_vectors = encode_sequences(model, hypotheses, normalize=True)

    def score(batch: list[Prepared]) -> tuple[list[str], torch.Tensor]:
        text_vectors = encode_sequences(model, [ids for _, ids in batch], normalize=True)
        return labels, (text_vectors @ label_vectors.T * ZERO_SHOT_SCALE).softmax(dim=-1).cpu()

    return score


def _prompt_renderer(labels: list[str]) -> Callable[[str], str]:
    # Naming the candidates up front lets an instruction-tuned model put its mass on them.
    header = f"Possible labels: {', '.join(labels)}.\n"
    return lambda text: f"{header}Text: {text}\nLabel:"


def _likelihood_scorer(
    model: LoadedModel, labels: list[str], label_ids: list[list[int]]
) -> Callable[[list[Prepared]], tuple[list[str], torch.Tensor]]:
    lm_head = model.model.get_output_embeddings()

    def score(batch: list[Prepared]) -> tuple[list[str], torch.Tensor]:
        sequences: list[list[int]] = []
        rows: list[int] = []  # which sequence each scored label token belongs to
        positions: list[int] = []  # the position whose output predicts it
        targets: list[int] = []
        for _, prompt in batch:
            for continuation in label_ids:
                seq = len(sequences)
                sequences.append(prompt + continuation)
                rows.extend([seq] * len(continuation))
                positions.extend(range(len(prompt) - 1, len(prompt) - 1 + len(continuation)))
                targets.extend(continuation)
        input_ids, mask = pad_batch(sequences, pad_id(model.tokenizer), left=False, device=model.device)
        hidden = model.model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # Project only the positions that predict label tokens: the full [seq, vocab] logits would be ~50k
        # floats per position.
        device = model.device
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
        log_probs = lm_head(picked).float().log_softmax(dim=-1)
        token_lp = log_probs.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1)
        # Mean, not sum: a label spanning more tokens must not lose just for being longer.
        totals = torch.zeros(len(sequences), device=device).index_add_(0, torch.tensor(rows, device=device), token_lp)
        lengths = torch.tensor([len(c) for c in label_ids], device=device).repeat(len(batch))
        mean_lp = (totals / lengths).view(len(batch), len(labels))
        return labels, mean_lp.softmax(dim=-1).cpu()

    return score
