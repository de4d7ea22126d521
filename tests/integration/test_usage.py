"""A real job's `usage` is what its items used: tokens summed from its stored results, compute from its shards.

Runs on SQLite and on PostgreSQL with the shared worker and the built-in models."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ItemResult, Shard
from tests.factories import jsonl_results, submit, wait_job
from tests.stack import WorkerProcess

pytestmark = pytest.mark.slow


def stored_usage(session_factory: sessionmaker[Session], job_id: str) -> tuple[int, int, float]:
    """(prompt tokens, completion tokens) summed over the job's item results, and its shards' compute seconds."""
    with session_factory() as session:
        prompt, completion = session.execute(
            select(func.sum(ItemResult.prompt_tokens), func.sum(ItemResult.completion_tokens)).where(
                ItemResult.job_id == job_id
            )
        ).one()
        seconds = session.scalar(select(func.sum(Shard.duration_seconds)).where(Shard.job_id == job_id))
    return int(prompt), int(completion), float(seconds)


def test_a_finished_job_uses_what_its_items_used(
    client: TestClient,
    tenant_a: dict[str, str],
    db_with_builtins: sessionmaker[Session],
    worker: WorkerProcess,
) -> None:
    generation = submit(
        client,
        tenant_a,
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": [{"prompt": "The capital of Italy is"}, {"messages": [{"role": "user", "content": "Hi!"}]}],
            "params": {"max_new_tokens": 6, "temperature": 0},
        },
    )
    embedding = submit(
        client,
        tenant_a,
        {"kind": "embed", "model": "all-minilm-l6-v2", "inputs": [{"text": "hello there"}, {"text": "world"}]},
    )
    finished = {}
    for job in (generation, embedding):
        done = finished[job["id"]] = wait_job(client, tenant_a, job["id"])
        assert done["status"] == "succeeded", done
        prompt, completion, seconds = stored_usage(db_with_builtins, job["id"])
        usage: dict[str, Any] = done["usage"]
        # Tokens: exactly the items' own, as stored with their results.
        assert prompt > 0 and (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
        assert usage["total_tokens"] == prompt + completion
        # Compute: one attempt per shard here, each on one device (a CPU worker process): its run time.
        assert usage["compute_seconds"] == pytest.approx(seconds, abs=2e-3) and seconds > 0
    # Embeddings count input tokens only; generation also its completions, as each result line reports them.
    assert finished[embedding["id"]]["usage"]["completion_tokens"] == 0
    generated = finished[generation["id"]]["usage"]
    lines = jsonl_results(client, tenant_a, generation["id"])
    assert generated["completion_tokens"] == sum(line["output"]["usage"]["completion_tokens"] for line in lines) > 0
    assert generated["prompt_tokens"] == sum(line["output"]["usage"]["prompt_tokens"] for line in lines)
