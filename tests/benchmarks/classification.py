"""cls-e2e: a 5,000-item zero-shot sentiment job on MiniLM through the stack, against the engine in-process.

The baseline gives the engine every item in one call, as one would in a notebook: it buckets all 5,000 by length.
The job is cut into shards, and each shard buckets only its own items; the run also times the engine on
shard-sized slices in-process (``sharding_ratio``), which splits the gap into "sharding" and "the pipeline
around the engine" (``ratio / sharding_ratio``).
"""

from __future__ import annotations

from typing import Any

from tests.benchmarks.common import Result, log, median, paired_rounds, production_defaults, sizes, timed
from tests.benchmarks.generation import engine_items
from tests.benchmarks.services import bench_stack, load_builtin
from tests.benchmarks.workloads import SENTIMENT_LABELS, review_texts
from workers.engines.params import ClassifyParams
from workers.engines.types import EngineItem, ItemResult

MODEL = "all-minilm-l6-v2"


def run_engine(model: Any, items: list[EngineItem], batch_size: int, chunk: int | None = None) -> list[ItemResult]:
    from workers.engines.classify import classify

    params = ClassifyParams(labels=SENTIMENT_LABELS)
    step = chunk or len(items)
    results: list[ItemResult] = []
    for start in range(0, len(items), step):
        results.extend(classify(model, items[start : start + step], params, batch_size=batch_size))
    return results


ROUNDS = 2


def bench_cls_e2e() -> Result:
    defaults = production_defaults()
    batch_size, shard_size = defaults["batch_size"], defaults["shard_size"]
    model = load_builtin(MODEL, "encoder")
    raw = review_texts(sizes().cls_items)
    items = engine_items(raw, "classify")
    n = len(items)
    body = {"kind": "classify", "model": MODEL, "inputs": raw, "params": {"labels": SENTIMENT_LABELS}}
    with bench_stack("cls-e2e", worker=True) as stack:
        stack.run_job({**body, "inputs": raw[:2]}, timeout=300)  # the worker loads and verifies MiniLM once
        run_engine(model, items[:64], batch_size)

        def e2e(_round: int) -> float:
            seconds = stack.run_job(body, timeout=900)
            log(f"cls-e2e: job through the stack in {seconds:.1f} s")
            return n / seconds

        def engine(_round: int) -> float:
            seconds = timed(lambda: run_engine(model, items, batch_size))[0]
            log(f"cls-e2e: engine in-process in {seconds:.1f} s")
            return n / seconds

        paired = paired_rounds(ROUNDS, e2e, engine)
        # Shard by shard, on a fifth of the items (the rate per item does not depend on how many shards): splits
        # the gap into sharding and pipeline.
        subset = items[: max(shard_size, n // 5 // shard_size * shard_size)]
        by_shard_rate = len(subset) / timed(lambda: run_engine(model, subset, batch_size, chunk=shard_size))[0]
        log(f"cls-e2e: engine in-process, shard by shard: {by_shard_rate:.0f} items/s")
    return Result(
        "cls-e2e",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        ">= 0.85",
        paired.ratio >= 0.85,
        {
            **paired.summary(),
            "items": n,
            "settings": {"shard_size": shard_size, "batch_size": batch_size},
            "engine_by_shard_items_per_s": round(by_shard_rate, 1),
            "sharding_ratio": round(by_shard_rate / median(paired.baseline), 3),
            "database": "postgresql",
        },
    )
