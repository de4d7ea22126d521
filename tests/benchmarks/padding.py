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
    prepare_builtin_models(MODEL_CACHE)
    defaults = production_defaults()
    batch_size, shard_size = defaults["batch_size"], defaults["shard_size"]
    chat = _chat_lengths(sizes().gen_prompts)
    bucketed = padding_fraction(chat, bucket_by_length(chat, batch_size))
    arrival = padding_fraction(chat, arrival_batches(len(chat), batch_size))
    reviews = _review_lengths(sizes().cls_items)
    return Result(
        "padding",
        bucketed,
        arrival,
        bucketed / arrival if arrival else None,
        "padding share",
        "<= 10% bucketed",
        bucketed <= 0.10,
        {
            "workload": f"gen-engine's {len(chat)} chat prompts (tokens {min(chat)}-{max(chat)}), batch {batch_size}",
            "bucketed_percent": round(100 * bucketed, 1),
            "arrival_percent": round(100 * arrival, 1),
            "cls_job_per_shard_bucketed_percent": round(
                100 * _per_shard(reviews, shard_size, batch_size, bucketed=True), 1
            ),
            "cls_job_per_shard_arrival_percent": round(
                100 * _per_shard(reviews, shard_size, batch_size, bucketed=False), 1
            ),
            "cls_job_whole_bucketed_percent": round(
                100 * padding_fraction(reviews, bucket_by_length(reviews, batch_size)), 1
            ),
        },
    )
