"""cls-e2e: a 5,000-item zero-shot sentiment job on MiniLM through the stack, against the engine in-process.

The baseline gives the engine every item in one call, as one would in a notebook: it buckets all 5,000 by length.
The job is cut into shards, and each shard buckets only its own items; the run also times the engine on
shard-sized slices in-process, which splits the gap into "sharding" and "the pipeline around the engine".
"""

from __future__ import annotations

from typing import Any

from tests.benchmarks.common import Result, Stack, load_builtin, log, production_defaults, sizes, timed
from tests.benchmarks.generation import engine_items
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


def bench_cls_e2e() -> Result:
    defaults = production_defaults()
    batch_size, shard_size = defaults["batch_size"], defaults["shard_size"]
    model = load_builtin(MODEL, "encoder")
    raw = review_texts(sizes().cls_items)
    items = engine_items(raw, "classify")
    body = {"kind": "classify", "model": MODEL, "inputs": raw, "params": {"labels": SENTIMENT_LABELS}}
    with Stack("cls-e2e", worker=True) as stack:
        stack.run_job({**body, "inputs": raw[:2]}, timeout=300)  # the worker loads and verifies MiniLM once
        run_engine(model, items[:64], batch_size)
        # engine, job, engine-by-shard, job, engine: each side measured next to the other.
        whole, sharded, e2e = [], [], []
        whole.append(timed(lambda: run_engine(model, items, batch_size))[0])
        log(f"cls-e2e: engine in-process {whole[-1]:.1f} s")
        e2e.append(stack.run_job(body, timeout=900))
        log(f"cls-e2e: job through the stack {e2e[-1]:.1f} s")
        sharded.append(timed(lambda: run_engine(model, items, batch_size, chunk=shard_size))[0])
        log(f"cls-e2e: engine in-process, shard by shard {sharded[-1]:.1f} s")
        e2e.append(stack.run_job(body, timeout=900))
        log(f"cls-e2e: job through the stack {e2e[-1]:.1f} s")
        whole.append(timed(lambda: run_engine(model, items, batch_size))[0])
        log(f"cls-e2e: engine in-process {whole[-1]:.1f} s")
    n = len(items)
    engine_rate = n / (sum(whole) / len(whole))
    e2e_rate = n / (sum(e2e) / len(e2e))
    sharded_rate = n / sharded[0]
    ratio = e2e_rate / engine_rate
    return Result(
        "cls-e2e",
        e2e_rate,
        engine_rate,
        ratio,
        "items/s",
        ">= 0.85",
        ratio >= 0.85,
        {
            "items": n,
            "settings": {"shard_size": shard_size, "batch_size": batch_size},
            "e2e_seconds": [round(s, 2) for s in e2e],
            "engine_seconds": [round(s, 2) for s in whole],
            "engine_by_shard_items_per_s": round(sharded_rate, 1),
            "sharding_ratio": round(sharded_rate / engine_rate, 3),
            "pipeline_ratio": round(e2e_rate / sharded_rate, 3),
            "database": "postgresql",
        },
    )
