"""Sentence embeddings: attention-mask-aware mean pooling of the last hidden state, for encoders and causal LMs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from workers.engines.common import Prepared, encode_sequences, run_batches, tokenize_texts
from workers.engines.types import EngineItem, ItemResult
from workers.models.loading import LoadedModel

if TYPE_CHECKING:
    # Annotations only: the engines run without pydantic (benchmarks' --engines-only, on a bare GPU host).
    from workers.engines.params import EmbedParams


def embed(
    model: LoadedModel,
    items: Sequence[EngineItem],
    params: EmbedParams,
    *,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[list[ItemResult]], None] | None = None,
) -> list[ItemResult]:
    """One ``{"embedding": [float, ...]}`` per item (unit length when ``params.normalize``)."""
    prepared, rejected = tokenize_texts(model, items)

    def run_batch(batch: list[Prepared]) -> list[ItemResult]:
        with torch.inference_mode():
            vectors = encode_sequences(model, [ids for _, ids in batch], normalize=params.normalize).cpu()
        return [
            ItemResult(item.index, item.custom_id, {"embedding": vector}, None, prompt_tokens=len(ids))
            for (item, ids), vector in zip(batch, vectors.tolist(), strict=True)
        ]

    return run_batches(prepared, rejected, run_batch, batch_size=batch_size, should_stop=should_stop, on_batch=on_batch)
