"""padding: the share of computed token positions that are padding, with and without length bucketing.

No model runs: the figure depends only on token lengths and on how they are cut into batches
(workers/engines/batching.py), so the tokenizers alone give it exactly.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.benchmarks.common import Result, production_defaults, sizes
from tests.benchmarks.workloads import chat_prompts, review_texts
from tests.stack import MODEL_CACHE
from workers.engines.batching import arrival_batches, bucket_by_length, padding_fraction
from workers.model_store import prepare_builtin_models


def _chat_lengths(count: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_CACHE / "smollm2-135m-instruct" / "1", local_files_only=True)
    texts = [
        tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
        for item in chat_prompts(count)
    ]
    # As the generate engine tokenizes: the template already holds the special tokens.
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _review_lengths(count: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_CACHE / "all-minilm-l6-v2" / "1", local_files_only=True)
    texts = [item["text"] for item in review_texts(count)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _per_shard(lengths: list[int], shard_size: int, batch_size: int, *, bucketed: bool) -> float:
    """Padding over a whole job when each shard batches only its own items, as a worker does."""
    batches: list[list[int]] = []
    for start in range(0, len(lengths), shard_size):
        shard = lengths[start : start + shard_size]
        cut = bucket_by_length(shard, batch_size) if bucketed else arrival_batches(len(shard), batch_size)
        batches.extend([start + p for p in batch] for batch in cut)
    return padding_fraction(lengths, batches)


def bench_padding() -> Result:
    """The headline is the cls-e2e job as workers batch it: each 64-item shard bucketed on its own."""
    prepare_builtin_models(MODEL_CACHE)
    defaults = production_defaults()
    batch_size, shard_size = defaults["batch_size"], defaults["shard_size"]
    reviews = _review_lengths(sizes().cls_items)
    bucketed = _per_shard(reviews, shard_size, batch_size, bucketed=True)
    arrival = _per_shard(reviews, shard_size, batch_size, bucketed=False)
    chat = _chat_lengths(sizes().gen_prompts)
    return Result(
        "padding",
        bucketed,
        arrival,
        bucketed / arrival if arrival else None,
        "padding share",
        "<= 10% bucketed",
        bucketed <= 0.10,
        {
            "workload": (
                f"cls-e2e's {len(reviews)} texts (tokens {min(reviews)}-{max(reviews)}) in {shard_size}-item "
                f"shards, batch {batch_size}, each shard batched on its own as a worker does"
            ),
            "bucketed_percent": round(100 * bucketed, 1),
            "arrival_percent": round(100 * arrival, 1),
            "whole_job_bucketed_percent": round(100 * _per_shard(reviews, len(reviews), batch_size, bucketed=True), 1),
            # What larger shards would give: bucketing can only sort within the shard it sees.
            "bucketed_percent_by_shard_size": {
                size: round(100 * _per_shard(reviews, size, batch_size, bucketed=True), 1)
                for size in (shard_size, 2 * shard_size, 4 * shard_size, 8 * shard_size)
            },
            "gen_prompts": f"{len(chat)} chat prompts (tokens {min(chat)}-{max(chat)}), batch {batch_size}",
            "gen_bucketed_percent": round(100 * padding_fraction(chat, bucket_by_length(chat, batch_size)), 1),
            "gen_arrival_percent": round(100 * padding_fraction(chat, arrival_batches(len(chat), batch_size)), 1),
        },
    )
