"""scale: items/s of a large classification job against the same job at 2,000 items, and the memory it takes.

A tiny 2-layer classifier keeps the model's own cost negligible, so what is measured is the pipeline: upload,
intake, shard rows, Redis messages, claims, result writes, and whether any of it grows with the job. The job
comes from an uploaded JSONL file (``POST /v1/files``, then ``input_file_id``), like a real large job. The API runs
in its own uvicorn process and the worker in its own, so their peak RSS is theirs alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tests.benchmarks.common import GIB, MIB, Result, log, production_defaults, sizes
from tests.benchmarks.services import PeakRss, bench_stack
from tests.benchmarks.workloads import review_texts
from tests.factories import builtin_model_dir
from tests.stack import MODEL_CACHE, Stack

MODEL = "bench-tiny-classifier"
RSS_LIMIT = GIB
# The large job is cut down to what this machine does in about this long (measured on the small job), so that
# `make bench` stays bounded on a slow or busy machine; the entry records the size it used.
LARGE_JOB_BUDGET_S = 150.0


def ensure_tiny_classifier() -> Path:
    """Build the tiny classifier once into the shared model cache (workers load only from under the store)."""
    from tests.tiny_models import build_tiny_classifier
    from workers.models.builtins import prepare_builtin_models

    dest = MODEL_CACHE / MODEL / "1"
    if (dest / "config.json").is_file():
        return dest
    prepare_builtin_models(MODEL_CACHE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and moved into place: a concurrent reader never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        build_tiny_classifier(tmp, builtin_model_dir("all-minilm-l6-v2"))
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _register(stack: Stack, path: Path) -> None:
    from db.registry import register_version
    from db.session import transaction
    from workers.models.store import directory_sha256, kinds_for_task

    with transaction(stack.session_factory) as session:
        register_version(
            session,
            name=MODEL,
            task="sequence-classification",
            kinds=kinds_for_task("sequence-classification"),
            artifact_uri=str(path.resolve()),
            sha256=directory_sha256(path),
            source="benchmark",
        )


def _upload(stack: Stack, count: int) -> str:
    path = stack.var_dir / f"input-{count}.jsonl"
    with path.open("w") as out:
        for item in review_texts(count, seed=count):
            out.write(json.dumps(item) + "\n")
    with path.open("rb") as handle:
        response = stack.client.post(
            "/v1/files",
            files={"file": (path.name, handle, "application/jsonl")},
            data={"purpose": "jobs"},
            headers=stack.headers,
        )
    response.raise_for_status()
    return str(response.json()["id"])


def _job(stack: Stack, count: int, timeout: float) -> tuple[float, float, str]:
    """(seconds from POST /v1/jobs to the job's end, seconds the POST itself took, the job id)."""
    file_id = _upload(stack, count)
    start = time.time()
    job_id = stack.submit({"kind": "classify", "model": MODEL, "input_file_id": file_id})
    posted = time.time() - start
    status, finished = stack.wait_finished(job_id, timeout=timeout, interval=0.5)
    if status != "succeeded":
        raise RuntimeError(f"job {job_id} of {count} items ended {status}")
    return finished - start, posted, job_id


def _shard_seconds(stack: Stack, job_id: str) -> list[float]:
    """How long each shard of a job took inside its worker, in shard order (recorded by finish_shard)."""
    from sqlalchemy import select

    from db.models import Shard

    with stack.session_factory() as session:
        rows = session.scalars(select(Shard.duration_seconds).where(Shard.job_id == job_id).order_by(Shard.index))
        return [float(d) for d in rows if d is not None]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def bench_scale() -> Result:
    size = sizes()
    defaults = production_defaults()
    model_dir = ensure_tiny_classifier()
    with bench_stack("scale", worker=True, api="uvicorn") as stack:
        _register(stack, model_dir)
        assert stack.api_process is not None and len(stack.workers) == 1
        _job(stack, 64, timeout=300)  # warm-up: the worker loads and verifies the model once
        with PeakRss({"api": stack.api_process.pid, "worker": stack.workers[0].process.pid}).running() as rss:
            small = [_job(stack, size.scale_small, timeout=600)]
            small_rate = size.scale_small / small[0][0]
            log(f"scale: {size.scale_small} items in {small[0][0]:.1f} s ({small_rate:.0f} items/s)")
            before_large = dict(rss.peak)
            large_n = min(size.scale_large, max(size.scale_small, int(small_rate * LARGE_JOB_BUDGET_S) // 1000 * 1000))
            large = _job(stack, large_n, timeout=max(900.0, 4 * LARGE_JOB_BUDGET_S))
            log(f"scale: {large_n} items in {large[0]:.1f} s ({large_n / large[0]:.0f} items/s)")
            small.append(_job(stack, size.scale_small, timeout=600))
            log(f"scale: {size.scale_small} items in {small[1][0]:.1f} s")
        shards = _shard_seconds(stack, large[2])
        small_shards = [d for job in small for d in _shard_seconds(stack, job[2])]
    small_rate = size.scale_small / (sum(s for s, _, _ in small) / len(small))
    large_rate = large_n / large[0]
    ratio = large_rate / small_rate
    peak_api, peak_worker = rss.peak["api"], rss.peak["worker"]
    extra = {
        "large_items": large_n,
        "small_items": size.scale_small,
        "large_seconds": round(large[0], 1),
        "large_post_seconds": round(large[1], 2),
        "small_seconds": [round(s, 2) for s, _, _ in small],
        # Within the large job: does a shard cost more once thousands are done? (flat = nothing grows with N)
        "large_job_shard_seconds_first_tenth": round(_mean(shards[: len(shards) // 10]), 4),
        "large_job_shard_seconds_last_tenth": round(_mean(shards[-(len(shards) // 10) :]), 4),
        "small_job_shard_seconds": round(_mean(small_shards), 4),
        "api_peak_rss_mib": round(peak_api / MIB),
        "worker_peak_rss_mib": round(peak_worker / MIB),
        "api_peak_rss_mib_before_large_job": round(before_large["api"] / MIB),
        "worker_peak_rss_mib_before_large_job": round(before_large["worker"] / MIB),
        "rss_under_1_gib": peak_api < RSS_LIMIT and peak_worker < RSS_LIMIT,
        "settings": {"shard_size": defaults["shard_size"], "batch_size": defaults["batch_size"]},
        "database": "postgresql",
        "rss_is": "peak resident set of the largest process in each tree (API: uvicorn; worker: celery + pool)",
    }
    if large_n < size.scale_large:
        extra["note"] = (
            f"large job cut to {large_n} items (of {size.scale_large}): what this machine does in about "
            f"{LARGE_JOB_BUDGET_S:.0f} s at the small job's rate"
        )
    return Result(
        "scale",
        large_rate,
        small_rate,
        ratio,
        "items/s",
        ">= 0.90, RSS < 1 GiB",
        ratio >= 0.90 and bool(extra["rss_under_1_gib"]),
        extra,
    )
