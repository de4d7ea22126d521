"""cls-e2e: a 5,000-item zero-shot sentiment job on MiniLM through the stack, against the engine in-process.

The baseline gives the engine every item in one call, as one would in a notebook: it buckets all 5,000 by length.
The job is cut into shards, and each shard buckets only its own items; the run also times the engine in-process on
a sample of the job's own shards (``sharding_ratio``), which splits the gap into "sharding" and "the pipeline
around the engine" (``ratio / sharding_ratio``).

Shards are sized as production sizes them (``shard_target_seconds``, db/sharding.py): from what the model's items
cost the worker before. The warm-up job (it also has the worker load MiniLM) is the model's first job, cut into
shards of ``shard_size``, and gives the worker that first measurement, as any earlier job of the model would.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from db.models import Shard
from db.sharding import item_index
from tests.benchmarks.common import Result, log, median, paired_rounds, production_defaults, sizes, timed
from tests.benchmarks.generation import engine_items
from tests.benchmarks.services import bench_stack, load_builtin
from tests.benchmarks.workloads import SENTIMENT_LABELS, review_texts
from tests.stack import Stack
from workers.engines.params import ClassifyParams
from workers.engines.types import EngineItem, ItemResult

MODEL = "all-minilm-l6-v2"


def run_engine(model: Any, items: list[EngineItem], batch_size: int) -> list[ItemResult]:
    from workers.engines.classify import classify

    return classify(model, items, ClassifyParams(labels=SENTIMENT_LABELS), batch_size=batch_size)


ROUNDS = 2


def bench_cls_e2e() -> Result:
    defaults = production_defaults()
    batch_size = defaults["batch_size"]
    model = load_builtin(MODEL, "encoder")
    raw = review_texts(sizes().cls_items)
    items = engine_items(raw, "classify")
    n = len(items)
    body = {"kind": "classify", "model": MODEL, "inputs": raw, "params": {"labels": SENTIMENT_LABELS}}
    shards: list[list[list[int]]] = []  # per round, each shard's item indexes
    with bench_stack("cls-e2e", worker=True) as stack:
        warm_up = {**body, "inputs": raw[: 4 * defaults["shard_size"]]}
        stack.run_job(warm_up, timeout=300)  # loads and verifies MiniLM; measures what an item costs
        run_engine(model, items[:64], batch_size)

        def e2e(_round: int) -> float:
            start = time.time()
            job_id = stack.submit(body)
            status, finished = stack.wait_finished(job_id, timeout=900)
            if status != "succeeded":
                raise RuntimeError(f"job {job_id} ended {status}")
            shards.append(_job_shards(stack, job_id))
            log(f"cls-e2e: job through the stack in {finished - start:.1f} s, shards of {_spread(shards[-1])}")
            return n / (finished - start)

        def engine(_round: int) -> float:
            seconds = timed(lambda: run_engine(model, items, batch_size))[0]
            log(f"cls-e2e: engine in-process in {seconds:.1f} s")
            return n / seconds

        paired = paired_rounds(ROUNDS, e2e, engine)
        # The last job's own shards (every fifth: their items' lengths span the job's) run in-process one by one:
        # splits the gap into sharding (each shard buckets only its own items) and the pipeline around the engine.
        sample = [[items[index] for index in shard] for shard in shards[-1][::5]]
        seconds = timed(lambda: [run_engine(model, shard, batch_size) for shard in sample])[0]
        by_shard_rate = sum(len(shard) for shard in sample) / seconds
        log(f"cls-e2e: engine in-process on {len(sample)} of the job's shards: {by_shard_rate:.0f} items/s")
    return Result(
        "cls-e2e",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        ">= 0.90",
        paired.ratio >= 0.90,
        {
            **paired.summary(),
            "items": n,
            "settings": {name: defaults[name] for name in ("shard_size", "shard_target_seconds", "batch_size")},
            "shards_per_round": [len(job) for job in shards],
            "shard_items_per_round": [_spread(job) for job in shards],
            "engine_by_shard_items_per_s": round(by_shard_rate, 1),
            "sharding_ratio": round(by_shard_rate / median(paired.baseline), 3),
            "database": "postgresql",
        },
    )


def _job_shards(stack: Stack, job_id: str) -> list[list[int]]:
    """The item indexes of each of the job's shards, in shard order."""
    with stack.session_factory() as session:
        rows = session.execute(
            select(Shard.start, Shard.items).where(Shard.job_id == job_id).order_by(Shard.index)
        ).all()
    return [[item_index(item, shard_start=start, offset=i) for i, item in enumerate(items)] for start, items in rows]


def _spread(job: list[list[int]]) -> str:
    """The items per shard, ``"min-max"`` or one number."""
    low, high = min(len(shard) for shard in job), max(len(shard) for shard in job)
    return str(high) if low == high else f"{low}-{high}"
