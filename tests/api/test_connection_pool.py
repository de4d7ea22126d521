"""A request holds at most one pooled database connection at a time.

A write route reads through its request session, then writes through a transaction of its own. When the
read's connection stayed checked out, each request needed two, and under load the pool starved: every
request held one and waited (30 s, the pool timeout) for a second. With a pool of exactly one connection,
each write route below would hang and fail if it still needed two.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.settings import Settings
from tests.factories import upload

CLASSIFY = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}, {"text": "awful"}],
    "params": {"labels": ["positive", "negative"]},
}


@pytest.fixture
def one_connection_client(unserved_settings: Settings, db_with_builtins: sessionmaker[Session]) -> Iterator[TestClient]:
    single = unserved_settings.model_copy(update={"database_pool_size": 1, "database_max_overflow": 0})
    with TestClient(create_app(single)) as client:
        yield client


def test_every_write_route_works_on_a_pool_of_one_connection(
    one_connection_client: TestClient, tenant_a: dict[str, str]
) -> None:
    client = one_connection_client
    # Given an API whose pool holds one connection and never lends a second
    # When a tenant creates a job, a batch and a fine-tune, lists, reads and cancels
    job = client.post("/v1/jobs", json=CLASSIFY, headers=tenant_a)
    requests = [
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": "x"},
        }
        for n in range(2)
    ]
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": upload(client, tenant_a, requests, purpose="batch"),
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        },
        headers=tenant_a,
    )
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    finetune = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "smollm2-135m-instruct",
            "training_file": upload(client, tenant_a, [chat] * 4, purpose="fine-tune"),
        },
        headers=tenant_a,
    )
    # Then each answers at once, as it would with a full pool.
    assert job.status_code == 202, job.text
    assert batch.status_code == 200, batch.text
    assert finetune.status_code == 200, finetune.text
    batch_id = batch.json()["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers=tenant_a).status_code == 200
    assert [b["id"] for b in client.get("/v1/batches", headers=tenant_a).json()["data"]] == [batch_id]
    cancelled = client.post(f"/v1/batches/{batch_id}/cancel", headers=tenant_a)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=tenant_a).json()["status"] == "cancelled"
