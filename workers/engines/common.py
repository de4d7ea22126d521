"""What the engines share: the batch loop (stop checks, progress, OOM halving), padding and mean pooling."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workers.engines.batching import bucket_by_length
from workers.engines.types import CONTEXT_LENGTH_EXCEEDED, INVALID_ITEM, OUT_OF_MEMORY, EngineItem, ItemResult
from workers.models.loading import LoadedModel

log = logging.getLogger(__name__)

# An item that passed its checks, with its token ids.
Prepared = tuple[EngineItem, list[int]]
BatchFn = Callable[[list[Prepared]], list[ItemResult]]
ShouldStop = Callable[[], bool]
OnBatch = Callable[[list[ItemResult]], None]


class BatchInterrupted(Exception):
    """A batch function saw ``should_stop`` say yes part-way (between decode steps): its results are unfinished, so
    the batch loop drops them and stops, and the items stay without a result for a re-run to take up."""


class ResultSink:
    """Every result of a shard so far, in the order they came, each group handed on to ``on_batch`` (which persists
    it) as it arrives: what a caller that stops early gets back is exactly what ``on_batch`` saw."""

    def __init__(self, on_batch: OnBatch | None) -> None:
        self.results: list[ItemResult] = []
        self._on_batch = on_batch

    def emit(self, batch_results: list[ItemResult]) -> None:
        self.results.extend(batch_results)
        if self._on_batch is not None:
            self._on_batch(batch_results)

    def emit_rejected(self, rejected: Sequence[ItemResult], should_stop: ShouldStop) -> bool:
        """Report the items refused before batching as a group of their own; False: stop before anything runs."""
        if rejected:
            if should_stop():
                return False
            self.emit(list(rejected))
        return True

    def in_order(self) -> list[ItemResult]:
        return sorted(self.results, key=lambda r: r.index)


def too_long(item: EngineItem, n_tokens: int, limit: int, what: str) -> ItemResult:
    return ItemResult.failed(
        item,
        CONTEXT_LENGTH_EXCEEDED,
        f"{what} needs {n_tokens} tokens but the model's context window is {limit} tokens",
    )


def run_batches(
    prepared: Sequence[Prepared],
    rejected: Sequence[ItemResult],
    run_batch: BatchFn,
    *,
    batch_size: int,
    should_stop: ShouldStop,
    on_batch: OnBatch | None,
    max_tokens: int | None = None,
    extra_tokens: int = 0,
) -> list[ItemResult]:
    """Run ``run_batch`` over length-bucketed batches and return every result so far, ordered by index.

    Items rejected before batching are reported first, as a batch of their own. ``should_stop`` is asked before
    each batch (and ``run_batch`` may ask it within one, raising BatchInterrupted); what is returned is exactly what
    was passed to ``on_batch``, so a caller that persists in ``on_batch`` and stops early can resume with the items
    it has no result for.
    """
    sink = ResultSink(on_batch)
    if not sink.emit_rejected(rejected, should_stop):
        return sink.results
    runner = _HalvingRunner(run_batch)
    lengths = [len(ids) for _, ids in prepared]
    for positions in bucket_by_length(lengths, batch_size, max_tokens, extra_tokens=extra_tokens):
        if should_stop():
            break
        try:
            batch_results = runner.run([prepared[p] for p in positions])
        except BatchInterrupted:
            break
        sink.emit(batch_results)
    return sink.in_order()


class _HalvingRunner:
    """Runs a batch; on CUDA out-of-memory halves it and retries, then keeps later batches at the size that fit.

    A single item that still does not fit gets an ``out_of_memory`` error; the rest of the shard goes on.
    """

    def __init__(self, run_batch: BatchFn) -> None:
        self._run_batch = run_batch
        self._limit: int | None = None  # largest batch known to fit, once an OOM has been seen

    def run(self, batch: list[Prepared]) -> list[ItemResult]:
        limit = self._limit or len(batch)
        out: list[ItemResult] = []
        for start in range(0, len(batch), limit):
            out.extend(self._run_or_halve(batch[start : start + limit]))
        return out

    def _run_or_halve(self, batch: list[Prepared]) -> list[ItemResult]:
        try:
            return self._run_batch(batch)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first so the failed attempt's tensors can be freed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            item, ids = batch[0]
            return [ItemResult.failed(item, OUT_OF_MEMORY, f"one item of {len(ids)} tokens does not fit in memory")]
        half = len(batch) // 2
        self._limit = half if self._limit is None else min(self._limit, half)
        log.warning("out of memory on a batch of %d items; retrying as batches of %d", len(batch), half)
        return self._run_or_halve(batch[:half]) + self._run_or_halve(batch[half:])


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for token id lists of different lengths."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the hidden states of real (unmasked) positions: [batch, seq, dim] → [batch, dim]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def encode_sequences(model: LoadedModel, sequences: Sequence[Sequence[int]], *, normalize: bool) -> torch.Tensor:
    """Mean-pooled last hidden states (float32, [n, dim]) for token id lists; L2-normalized when asked.

    Right padding: the forward pass gets no position ids, so padding must come after the real tokens for causal
    models to see the same positions as unpadded. ``base_model`` skips a causal LM's vocabulary projection.
    """
    input_ids, mask = pad_batch(sequences, pad_id(model.tokenizer), left=False, device=model.device)
    hidden = model.model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    pooled = mean_pool(hidden.float(), mask)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def tokenize_texts(
    model: LoadedModel,
    items: Sequence[EngineItem],
    *,
    render: Callable[[str], str] | None = None,
    extra_tokens: int = 0,
) -> tuple[list[Prepared], list[ItemResult]]:
    """Token ids of each item's ``text`` (put through ``render`` first); empty or over-long texts become item errors.

    ``extra_tokens`` counts tokens an engine appends later, so the length check covers the whole sequence.
    """
    limit = model.context_window()
    prepared: list[Prepared] = []
    rejected: list[ItemResult] = []
    texts = [item.input.get("text") or "" for item in items]
    rendered = [render(t) if render else t for t in texts if t]
    encoded = model.tokenizer(rendered, add_special_tokens=True)["input_ids"] if rendered else []
    it = iter(encoded)
    for item, text in zip(items, texts, strict=True):
        if not text:
            rejected.append(ItemResult.failed(item, INVALID_ITEM, "empty text"))
            continue
        ids = list(next(it))
        if len(ids) + extra_tokens > limit:
            rejected.append(too_long(item, len(ids) + extra_tokens, limit, "the text"))
        else:
            prepared.append((item, ids))
    return prepared, rejected
