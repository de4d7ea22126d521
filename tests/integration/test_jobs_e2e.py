"""Jobs end to end: API app → database → Redis → a real Celery worker process → results.

Runs on SQLite and on PostgreSQL (the `backend` fixture), with the built-in models.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ItemResult
from tests.factories import jsonl_results, submit, wait_job
from tests.integration.sentences import NEGATIVE, POSITIVE
from tests.stack import WorkerProcess, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(
    client: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> Any:
    return client, tenant_a, db_with_builtins


def test_greedy_chat_generation_knows_the_capital_of_france(stack: Any) -> None:
    client, headers, _ = stack
    job = submit(
        client,
        headers,
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": [
                {"custom_id": "france", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                {"custom_id": "plain", "prompt": "The capital of Italy is"},
            ],
            "params": {"max_new_tokens": 24, "temperature": 0},
        },
    )
    done = wait_job(client, headers, job["id"])
    assert done["status"] == "succeeded", done
    assert done["counts"] == {"total": 2, "succeeded": 2, "failed": 0}
    assert done["throughput"]["tokens_per_second"] > 0
    france, plain = jsonl_results(client, headers, job["id"])
    assert france["custom_id"] == "france" and "Paris" in france["output"]["text"], france
    assert france["output"]["finish_reason"] in ("stop", "length")
    assert france["output"]["usage"]["completion_tokens"] > 0
    assert plain["output"]["text"]


def test_thousand_item_classification_has_each_index_once_in_order(stack: Any) -> None:
    client, headers, sessions = stack
    texts = [(POSITIVE + NEGATIVE)[i % 40] + f" (#{i})" for i in range(1000)]
    job = submit(
        client,
        headers,
        {
            "kind": "classify",
            "model": "all-minilm-l6-v2",
            "inputs": [{"custom_id": f"row-{i}", "text": text} for i, text in enumerate(texts)],
            "params": {"labels": ["positive", "negative"]},
        },
    )
    done = wait_job(client, headers, job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 1000, done
    results = jsonl_results(client, headers, job["id"])
    assert [r["index"] for r in results] == list(range(1000))
    assert [r["custom_id"] for r in results] == [f"row-{i}" for i in range(1000)]
    with sessions() as session:
        assert session.scalar(select(func.count()).where(ItemResult.job_id == job["id"])) == 1000
    page = client.get(f"/v1/jobs/{job['id']}/results?offset=990&limit=20", headers=headers).json()
    assert [r["index"] for r in page["data"]] == list(range(990, 1000)) and page["next_offset"] is None


def test_zero_shot_sentiment_with_minilm_is_mostly_right(stack: Any) -> None:
    client, headers, _ = stack
    labelled = [(text, "positive") for text in POSITIVE] + [(text, "negative") for text in NEGATIVE]
    job = submit(
        client,
        headers,
        {
            "kind": "classify",
            "model": "all-minilm-l6-v2",
            "inputs": [{"text": text} for text, _ in labelled],
            "params": {"labels": ["positive", "negative"]},
        },
    )
    assert wait_job(client, headers, job["id"])["status"] == "succeeded"
    results = jsonl_results(client, headers, job["id"])
    correct = sum(r["output"]["label"] == label for r, (_, label) in zip(results, labelled, strict=True))
    assert correct / len(labelled) >= 0.9, f"{correct}/{len(labelled)}"
    assert abs(sum(results[0]["output"]["scores"].values()) - 1.0) < 1e-3


def test_embedding_job_returns_unit_vectors_of_the_model_width(stack: Any) -> None:
    client, headers, _ = stack
    job = submit(
        client,
        headers,
        {"kind": "embed", "model": "all-minilm-l6-v2", "inputs": [{"text": "hello"}, {"text": "world"}]},
    )
    assert wait_job(client, headers, job["id"])["status"] == "succeeded"
    for result in jsonl_results(client, headers, job["id"]):
        vector = result["output"]["embedding"]
        assert len(vector) == 384
        assert abs(sum(v * v for v in vector) - 1.0) < 1e-3


def test_one_malformed_item_fails_alone(stack: Any) -> None:
    client, headers, _ = stack
    job = submit(
        client,
        headers,
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": [
                {"prompt": "Say hello."},
                {"custom_id": "bad", "messages": []},
                {"messages": [{"role": "user", "content": "Count to three."}]},
            ],
            "params": {"max_new_tokens": 8},
        },
    )
    done = wait_job(client, headers, job["id"])
    assert done["status"] == "succeeded"
    assert done["counts"] == {"total": 3, "succeeded": 2, "failed": 1}
    good, bad, other = jsonl_results(client, headers, job["id"])
    assert bad["custom_id"] == "bad" and bad["output"] is None and bad["error"]["message"]
    assert good["error"] is None and other["error"] is None


def test_cancelling_a_running_job_stops_it_within_a_batch(stack: Any, settings: Any) -> None:
    client, headers, sessions = stack
    prompts = [{"prompt": f"Write a long story about a dragon number {i}."} for i in range(64)]
    job = submit(
        client,
        headers,
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": prompts,
            "params": {"max_new_tokens": 48},
        },
    )

    def some_results() -> int:
        with sessions() as session:
            return int(session.scalar(select(func.count()).where(ItemResult.job_id == job["id"])) or 0)

    wait_for(some_results, timeout=180, interval=0.2, what="a first batch of results")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    at_cancel = some_results()
    done = wait_job(client, headers, job["id"], timeout=120)
    assert done["status"] == "cancelled"
    written = some_results()
    # At most the batch that was running when the cancel arrived is added afterwards.
    assert at_cancel <= written <= at_cancel + settings.batch_size
    assert written < len(prompts)
    readable = jsonl_results(client, headers, job["id"])
    assert len(readable) == written and all(r["output"]["text"] is not None for r in readable)
