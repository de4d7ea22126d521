"""padding: the share of computed token positions that are padding, with and without length bucketing.

No model runs: the figure depends only on token lengths and on how they are cut into batches
(workers/engines/batching.py), so the tokenizers alone give it exactly.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from db.sharding import cut_shards, item_index
from tests.benchmarks.common import Result, production_defaults, sizes
from tests.benchmarks.workloads import chat_prompts, review_texts
from tests.factories import builtin_model_dir
from tests.stack import MODEL_CACHE
from workers.engines.batching import arrival_batches, bucket_by_length, padding_fraction
from workers.models.builtins import prepare_builtin_models


def _chat_lengths(count: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m-instruct"), local_files_only=True)
    texts = [
        tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
        for item in chat_prompts(count)
    ]
    # As the generate engine tokenizes: the template already holds the special tokens.
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _review_lengths(texts: list[str]) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("all-minilm-l6-v2"), local_files_only=True)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _per_shard(texts: list[str], lengths: list[int], shard_size: int, batch_size: int, *, sort_window: int) -> float:
    """Padding over a whole job as the job path batches it: the API cuts shards (db/sharding.py, sorting
    ``sort_window`` shards' worth of items by their text length), then each worker length-buckets one shard.
    ``sort_window`` 0: arrival order and no bucketing at all, the baseline."""
    items = [{"input": {"text": text}} for text in texts]
    batches: list[list[int]] = []
    for cut in cut_shards(items, shard_size=shard_size, sort_window=max(sort_window, 1)):
        indexes = [item_index(item, shard_start=cut.start, offset=o) for o, item in enumerate(cut.items)]
        shard = [lengths[i] for i in indexes]
        positions = bucket_by_length(shard, batch_size) if sort_window else arrival_batches(len(shard), batch_size)
        batches.extend([indexes[p] for p in batch] for batch in positions)
    return padding_fraction(lengths, batches)


def bench_padding() -> Result:
    """The headline is the cls-e2e job as workers batch it: each 64-item shard bucketed on its own."""
    prepare_builtin_models(MODEL_CACHE)
    defaults = production_defaults()
    batch_size, shard_size = defaults["batch_size"], defaults["shard_size"]
    texts = [item["text"] for item in review_texts(sizes().cls_items)]
    reviews = _review_lengths(texts)
    window = defaults["shard_sort_window"]
    bucketed = _per_shard(texts, reviews, shard_size, batch_size, sort_window=window)
    arrival = _per_shard(texts, reviews, shard_size, batch_size, sort_window=0)
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
                f"shards cut from windows of {window} shards sorted by text length, batch {batch_size}, each "
                "shard length-bucketed on its own as a worker does"
            ),
            "bucketed_percent": round(100 * bucketed, 1),
            "arrival_percent": round(100 * arrival, 1),
            "whole_job_sorted_percent": round(
                100 * _per_shard(texts, reviews, len(reviews), batch_size, sort_window=1), 1
            ),
            # What other windows give: 1 is bucketing within a shard alone.
            "bucketed_percent_by_sort_window": {
                size: round(100 * _per_shard(texts, reviews, shard_size, batch_size, sort_window=size), 1)
                for size in (1, 2, 4, 8, 16)
            },
            "gen_prompts": f"{len(chat)} chat prompts (tokens {min(chat)}-{max(chat)}), batch {batch_size}",
            "gen_bucketed_percent": round(100 * padding_fraction(chat, bucket_by_length(chat, batch_size)), 1),
            # As the generate engine cuts them on the CPU: also by padded positions (prompt + 32 new tokens).
            "gen_token_budget_percent": round(
                100
                * padding_fraction(
                    chat, bucket_by_length(chat, batch_size, defaults["generate_batch_tokens"], extra_tokens=32)
                ),
                1,
            ),
            "gen_arrival_percent": round(100 * padding_fraction(chat, arrival_batches(len(chat), batch_size)), 1),
        },
    )
