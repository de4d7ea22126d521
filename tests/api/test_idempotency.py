"""Idempotency-Key on the POSTs that create something: a retry returns the first answer and creates nothing new; a
key reused for another request is refused; a failed request frees its key; an expired key is claimed afresh."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.idempotency import ABANDONED_AFTER, ClaimOutcome, claim_key
from db.models import Batch, IdempotentRequest, Job, StoredFile, utcnow
from db.session import transaction
from db.settings import Settings
from tests.factories import auth_headers, queue_lengths, snapshot, upload
from tests.stack import serve_in_thread

CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}, {"text": "awful"}],
    "params": {"labels": ["positive", "negative"]},
}
EMBED_BODY = {"model": "all-minilm-l6-v2", "input": "hello"}
EMBED_LINE = {"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": EMBED_BODY}


@pytest.fixture
def door(
    unserved_client: TestClient, db_with_builtins: sessionmaker[Session], tenant_a: dict[str, str]
) -> Iterator[TestClient]:
    yield unserved_client


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def rows(sessions: sessionmaker[Session], table: type[Any]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def test_a_retried_job_post_creates_one_job(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], unserved_settings: Settings
) -> None:
    # Given a job posted with an Idempotency-Key
    first = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "job-key-1"))
    assert first.status_code == 202, first.text
    queued = queue_lengths(unserved_settings.redis_url)
    # When the client retries it, twice (it never saw the answer)
    retries = [door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "job-key-1")) for _ in range(2)]
    # I expect the first answer each time, flagged as replayed, one job, and nothing more queued.
    for retry in retries:
        assert (retry.status_code, retry.json()) == (202, first.json())
        assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert rows(db_with_builtins, Job) == 1
    assert queue_lengths(unserved_settings.redis_url) == queued
    # And without a key, the same body is a new job.
    assert door.post("/v1/jobs", json=CLASSIFY, headers=tenant_a).json()["id"] != first.json()["id"]


def test_a_retried_batch_post_creates_one_batch(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    file_id = upload(door, tenant_a, [EMBED_LINE], purpose="batch")
    body = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    answers = [door.post("/v1/batches", json=body, headers=keyed(tenant_a, "batch-key")) for _ in range(3)]
    assert {(a.status_code, a.json()["id"], a.json()["status"]) for a in answers} == {
        (200, answers[0].json()["id"], "in_progress")
    }
    assert (rows(db_with_builtins, Batch), rows(db_with_builtins, Job)) == (1, 1)


def test_a_retried_upload_creates_one_file(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], unserved_settings: Settings
) -> None:
    def send() -> Any:
        files = {"file": ("in.jsonl", b'{"text": "a"}\n')}
        return door.post("/v1/files", files=files, data={"purpose": "batch"}, headers=keyed(tenant_a, "file-key"))

    first = send()
    assert first.status_code == 200, first.text
    before = snapshot(db_with_builtins, unserved_settings.files_dir)
    retry = send()
    # The retry's bytes were stored while it was read, and removed once it was known for a retry.
    assert (retry.status_code, retry.json()) == (200, first.json())
    assert snapshot(db_with_builtins, unserved_settings.files_dir) == before
    assert rows(db_with_builtins, StoredFile) == 1


@pytest.mark.parametrize(
    ("second", "where"),
    [
        ("/v1/jobs", "with another body"),
        ("/v1/batches", "for POST /v1/jobs"),
        ("/v1/files", "for POST /v1/jobs"),
    ],
)
def test_a_key_reused_for_another_request_is_refused_naming_the_header(
    door: TestClient,
    tenant_a: dict[str, str],
    db_with_builtins: sessionmaker[Session],
    unserved_settings: Settings,
    second: str,
    where: str,
) -> None:
    # Given a key that answered a job
    assert door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "reused")).status_code == 202
    before = snapshot(db_with_builtins, unserved_settings.files_dir)
    # When it comes back with another body, or on another endpoint
    headers = keyed(tenant_a, "reused")
    if second == "/v1/jobs":
        response = door.post(second, json={**CLASSIFY, "priority": 5}, headers=headers)
    elif second == "/v1/batches":
        response = door.post(second, json={"input_file_id": "file-x", "endpoint": "/v1/embeddings"}, headers=headers)
    else:
        response = door.post(second, files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"}, headers=headers)
    # I expect a 422 naming the header, and nothing written.
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")
    assert where in error["message"]
    assert snapshot(db_with_builtins, unserved_settings.files_dir) == before


def test_a_failed_request_frees_its_key_for_the_corrected_retry(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    # Given a request with a key that was refused (an unknown model)
    refused = door.post("/v1/jobs", json={**CLASSIFY, "model": "no-such-model"}, headers=keyed(tenant_a, "fix-me"))
    assert refused.status_code == 404
    # When the client fixes the request and retries with the same key
    fixed = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "fix-me"))
    # I expect it to run, and its answer to be the one kept.
    assert fixed.status_code == 202, fixed.text
    again = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "fix-me"))
    assert again.json()["id"] == fixed.json()["id"] and rows(db_with_builtins, Job) == 1


def test_a_retry_while_the_first_request_runs_gets_409(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    # Given a key claimed by a request that has not answered yet (another API process, mid-request)
    body = json.dumps(CLASSIFY).encode()
    first = door.post(
        "/v1/jobs", content=body, headers={**keyed(tenant_a, "probe"), "content-type": "application/json"}
    )
    with db_with_builtins() as session:
        tenant_id = session.scalars(select(Job.tenant_id)).one()
    with transaction(db_with_builtins) as session:
        claim = claim_key(
            session,
            tenant_id=tenant_id,
            key="in-flight",
            endpoint="POST /v1/jobs",
            request_sha256=hashlib.sha256(body).hexdigest(),
            ttl_seconds=3600,
        )
    assert first.status_code == 202 and claim.outcome is ClaimOutcome.CLAIMED
    # When the same request comes with that key
    response = door.post(
        "/v1/jobs", content=body, headers={**keyed(tenant_a, "in-flight"), "content-type": "application/json"}
    )
    # I expect 409 naming the header, and no second job.
    assert response.status_code == 409, response.text
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert rows(db_with_builtins, Job) == 1

    # Given that claim left unanswered for longer than any request runs (its API process died mid-request)
    with transaction(db_with_builtins) as session:
        session.execute(
            update(IdempotentRequest)
            .where(IdempotentRequest.key == "in-flight")
            .values(created_at=utcnow() - ABANDONED_AFTER - timedelta(seconds=1))
        )
    # When the client retries, I expect the retry to take the key over and run once.
    retried = door.post(
        "/v1/jobs", content=body, headers={**keyed(tenant_a, "in-flight"), "content-type": "application/json"}
    )
    assert retried.status_code == 202, retried.text
    assert rows(db_with_builtins, Job) == 2


def test_an_expired_key_is_claimed_afresh(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], unserved_settings: Settings
) -> None:
    first = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "old-key")).json()
    # Given that key's first answer older than the TTL
    age = timedelta(seconds=unserved_settings.idempotency_ttl_seconds + 1)
    with transaction(db_with_builtins) as session:
        session.execute(update(IdempotentRequest).values(created_at=utcnow() - age))
    # When it is used again, I expect a new job, and the key to hold the new answer.
    second = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "old-key")).json()
    assert second["id"] != first["id"]
    assert door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "old-key")).json()["id"] == second["id"]
    assert rows(db_with_builtins, IdempotentRequest) == 1


def test_keys_are_per_tenant(
    door: TestClient, tenant_a: dict[str, str], tenant_b: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    a = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_a, "shared-key"))
    b = door.post("/v1/jobs", json=CLASSIFY, headers=keyed(tenant_b, "shared-key"))
    assert (a.status_code, b.status_code) == (202, 202) and a.json()["id"] != b.json()["id"]


@pytest.mark.parametrize("key", ["k" * 256, "", "caf\u00e9"], ids=["256 characters", "empty", "not ASCII"])
def test_a_malformed_key_is_refused_naming_the_header(
    door: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], key: str
) -> None:
    headers = {name.encode(): value.encode() for name, value in tenant_a.items()}
    headers[b"Idempotency-Key"] = key.encode("latin-1")  # as a client may send it, past httpx's ASCII check
    response = door.post("/v1/jobs", json=CLASSIFY, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert rows(db_with_builtins, Job) == 0 and rows(db_with_builtins, IdempotentRequest) == 0


def test_concurrent_retries_through_a_real_server_create_one_job(
    unserved_settings: Settings, db_with_builtins: sessionmaker[Session]
) -> None:
    # Given a real server and 6 copies of one request with one key, sent at once
    headers = keyed(auth_headers(db_with_builtins, "racer"), "race")
    with (
        serve_in_thread(create_app(unserved_settings)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        answers = list(pool.map(lambda _: client.post("/v1/jobs", json=CLASSIFY, headers=headers), range(6)))
    # I expect one job: each answer is either it (first or replayed) or a 409 while it was being made.
    assert rows(db_with_builtins, Job) == 1
    with db_with_builtins() as session:
        job_id = session.scalars(select(Job.id)).one()
    assert {a.status_code for a in answers} <= {202, 409}
    assert all(a.json()["id"] == job_id for a in answers if a.status_code == 202)
